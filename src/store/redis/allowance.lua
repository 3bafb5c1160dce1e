-- Mirrors AccountBook::allowance_usage.
-- Loaded by src/store/redis/scripts.rs with include_str!; see it for KEYS and ARGV.
expire_due()
prune_counter(ARGV[4], ARGV[5])
local c = get_counter(ARGV[4], ARGV[5])
if not c then return done({'usage', 0, 0}) end
return done({'usage', c.used, c.held})
