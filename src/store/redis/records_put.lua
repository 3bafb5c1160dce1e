-- Mirrors MemoryRecords::put (src/store/records_memory.rs): write one recorded response, then
-- drop the account's records that expired and the oldest beyond the per-account cap.
-- Loaded by src/store/redis/records.rs with include_str!.
--
-- KEYS[1]  the account's base key `{prefix}{<len>:<account>}` (every key below shares its
--          hash slot)
-- ARGV[1]  now (unix seconds, an integer below 2^53)
-- ARGV[2]  retention (seconds)
-- ARGV[3]  the most records the account keeps
-- ARGV[4]  the reservation key the record is written under
-- ARGV[5]  the record (ResponseRecord::to_bytes)
--
-- A record is a hash {exp = now + retention, data = bytes} at `<base>:rr:<key>`; the index
-- `<base>:rri` scores each key by when it was written. The hash also gets a Redis TTL of the
-- retention, so records the index forgets still go.
local B = KEYS[1]
local now = tonumber(ARGV[1])
local retention = tonumber(ARGV[2])
local cap = tonumber(ARGV[3])
local key = ARGV[4]
local index = B .. ':rri'
local function rk(k) return B .. ':rr:' .. k end

redis.call('HSET', rk(key), 'exp', string.format('%d', now + retention), 'data', ARGV[5])
redis.call('EXPIRE', rk(key), math.max(retention, 1))
redis.call('ZADD', index, now, key)

-- Expired: written at or before now - retention.
local old = redis.call('ZRANGEBYSCORE', index, '-inf', string.format('%d', now - retention))
for _, k in ipairs(old) do
  redis.call('DEL', rk(k))
  redis.call('ZREM', index, k)
end
-- Beyond the cap: the oldest first.
local n = redis.call('ZCARD', index)
if n > cap then
  local over = redis.call('ZRANGE', index, 0, n - cap - 1)
  for _, k in ipairs(over) do
    redis.call('DEL', rk(k))
    redis.call('ZREM', index, k)
  end
end
redis.call('EXPIRE', index, math.max(retention, 1))
return 'ok'
