-- Mirrors MemoryKeyStore::insert: both indexes written together, or a conflict.
-- Loaded by src/store/redis/keys.rs with include_str!.
-- KEYS: 1 the digest's hash, 2 the id's string, 3 the account's set of ids (one hash slot).
-- ARGV: 1 id, 2 account, 3 digest (hex).
local hex = redis.call('GET', KEYS[2])
local rec = redis.call('HMGET', KEYS[1], 'id', 'account')
if hex == false and rec[1] == false then
  redis.call('HSET', KEYS[1], 'id', ARGV[1], 'account', ARGV[2])
  redis.call('SET', KEYS[2], ARGV[3])
  redis.call('SADD', KEYS[3], ARGV[1])
  return 1
end
if hex == ARGV[3] and rec[1] == ARGV[1] and rec[2] == ARGV[2] then return 1 end
return 0
