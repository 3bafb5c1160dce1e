-- Mirrors AccountBook::deposit.
-- Loaded by src/store/redis/scripts.rs with include_str!; see it for KEYS and ARGV.
local key, amount = ARGV[4], tonumber(ARGV[5])
expire_due()
local dk = B .. ':d:' .. key
local d = hgetall(dk)
if d and tonumber(d.at) + RETENTION <= NOW then
  redis.call('DEL', dk)
  d = nil
end
if d then
  if tonumber(d.amount) ~= amount then return done({'conflict'}) end
  return done(bal_reply('unchanged'))
end
if bal.deposited + amount > MAX then return done({'range'}) end
bal.deposited = bal.deposited + amount
credit(amount)
dirty = true
redis.call('HSET', dk, 'amount', s(amount), 'at', s(NOW))
redis.call('EXPIRE', dk, s(GC))
journal(NOW, 'deposit', amount, nil, key)
return done(bal_reply('applied'))
