-- Mirrors BudgetBook::usage (src/budget/store.rs): one counter, after the lazy expiry.
-- ARGV (after the prelude's): 3 counter id. Reply: {used, held} in decimal.
local cur = redis.call('HMGET', counter_key(ARGV[3]), 'used', 'held')
if not cur[1] then return {'0', '0'} end
return {cur[1], cur[2]}
