-- Mirrors MemoryKeyStore::remove: the digest, the id and the account's entry go together.
-- Loaded by src/store/redis/keys.rs with include_str!.
-- KEYS: 1 the id's string. ARGV: 1 the digest hash's key prefix, 2 the account sets' key
-- prefix, 3 id.
local hex = redis.call('GET', KEYS[1])
if hex == false then return 0 end
local dk = ARGV[1] .. hex
local account = redis.call('HGET', dk, 'account')
redis.call('DEL', dk, KEYS[1])
if account then
  redis.call('SREM', ARGV[2] .. string.len(account) .. ':' .. account, ARGV[3])
end
return 1
