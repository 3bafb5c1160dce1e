-- Mirrors AccountBook::balance.
-- Loaded by src/store/redis/scripts.rs with include_str!; see it for KEYS and ARGV.
expire_due()
return done(bal_reply('balance'))
