-- Mirrors MemoryKeyStore::expire: the key's end only moves earlier.
-- Loaded by src/store/redis/keys.rs with include_str!.
-- KEYS: 1 the id's string. ARGV: 1 the digest hash's key prefix, 2 at, 3 now (unix seconds,
-- the caller's clock), 4 how long past its end an invalid key is kept (seconds).
local hex = redis.call('GET', KEYS[1])
if hex == false then return 0 end
local dk = ARGV[1] .. hex
local cur = tonumber(redis.call('HGET', dk, 'not_after'))
local at = tonumber(ARGV[2])
if cur == nil or at < cur then
  redis.call('HSET', dk, 'not_after', ARGV[2])
  cur = at
end
-- A TTL from the caller's clock: Redis's own may disagree with it.
local ttl = string.format('%d', math.max(cur - tonumber(ARGV[3]), 0) + tonumber(ARGV[4]))
redis.call('EXPIRE', dk, ttl)
redis.call('EXPIRE', KEYS[1], ttl)
return 1
