-- Mirrors BudgetBook::hold (src/budget/store.rs): all lines or none, in one script.
-- ARGV (after the prelude's): 3 hold id, 4 expires_at, 5 n, then per line: counter id,
-- meter (`-` for credits, `+<name>` for a meter), resets_at, limit, amount.
-- Reply: {'held'} | {'already'} | {'noroom', line index (from 0), used + held on it}.
local h = ARGV[3]
local hk = hold_key(h)
local old = hgetall(hk)
if old and old.st == 'o' then return {'already'} end
local n = tonumber(ARGV[5])
local lines = {}
for i = 1, n do
  local j = 5 + (i - 1) * 5
  lines[i] = {c = ARGV[j + 1], m = ARGV[j + 2], re = ARGV[j + 3], limit = U(ARGV[j + 4]),
    a = U(ARGV[j + 5])}
end
-- Every line checked against the counters as they are, before anything is held.
for i, l in ipairs(lines) do
  local cur = redis.call('HMGET', counter_key(l.c), 'used', 'held')
  local taken = ZERO
  if cur[1] then taken = sadd(U(cur[1]), U(cur[2])) end
  local t = add(taken, l.a)
  if not (t and le(t, l.limit)) then return {'noroom', i - 1, S(taken)} end
end
for _, l in ipairs(lines) do
  local held = redis.call('HGET', counter_key(l.c), 'held')
  if held then
    redis.call('HSET', counter_key(l.c), 'held', S(sadd(U(held), l.a)))
  else
    new_counter(l.c, l.re, ZERO, l.a)
  end
end
-- A lapsed hold under this key is replaced by the new one.
if old then
  redis.call('ZREM', LAPSED, stamp(sadd(U(old.ex), RETENTION), h))
  redis.call('DEL', hk)
end
local ex = S(U(ARGV[4]))
local fields = {'st', 'o', 'ex', ex, 'n', string.format('%d', n)}
for i, l in ipairs(lines) do
  fields[#fields + 1] = 'c' .. i; fields[#fields + 1] = l.c
  fields[#fields + 1] = 'a' .. i; fields[#fields + 1] = S(l.a)
  fields[#fields + 1] = 'r' .. i; fields[#fields + 1] = l.re
  if string.sub(l.m, 1, 1) == '+' then
    fields[#fields + 1] = 'm' .. i; fields[#fields + 1] = string.sub(l.m, 2)
  end
end
redis.call('HSET', hk, unpack(fields))
redis.call('ZADD', OPEN, 0, stamp(U(ex), h))
return {'held'}
