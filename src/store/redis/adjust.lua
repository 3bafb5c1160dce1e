-- Mirrors AccountBook::adjust.
-- Loaded by src/store/redis/scripts.rs with include_str!; see it for KEYS and ARGV.
local key, dir, amount, reason = ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7]
expire_due()
local xk = B .. ':x:' .. key
local x = hgetall(xk)
if x and tonumber(x.at) + RETENTION <= NOW then
  redis.call('DEL', xk)
  x = nil
end
if x then
  if x.dir ~= dir or tonumber(x.amount) ~= amount then return done({'conflict'}) end
  return done({'unchanged', bal.available})
end
if dir == 'credit' then
  if bal.deposited + amount > MAX then return done({'range'}) end
  bal.deposited = bal.deposited + amount
  credit(amount)
else
  if amount > bal.available or amount > bal.deposited then return done({'range'}) end
  bal.deposited = bal.deposited - amount
  bal.available = bal.available - amount
end
dirty = true
redis.call('HSET', xk, 'dir', dir, 'amount', s(amount), 'at', s(NOW))
redis.call('EXPIRE', xk, s(GC))
journal(NOW, 'adjustment', amount, dir, key, reason)
return done({'applied', bal.available})
