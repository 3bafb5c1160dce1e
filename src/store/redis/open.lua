-- Mirrors AccountBook::open_reservations (diagnostics).
-- Loaded by src/store/redis/scripts.rs with include_str!; see it for KEYS and ARGV.
expire_due()
return done({'open', redis.call('ZCARD', B .. ':open')})
