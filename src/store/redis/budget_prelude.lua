-- Mirrors BudgetBook::expire and BudgetBook::give_back (src/budget/store.rs): lazy lapsing of
-- the holds due at the caller's `now`, then forgetting finished holds and old counters.
-- Loaded by src/store/redis/budgets.rs with include_str!, before each budget script.
-- KEYS: 1 the base `{prefix}{budgets}:` (every key below starts with it: one hash slot).
-- ARGV: 1 now, 2 the retention time (BUDGET_RETENTION_SECS), then each script's own.
--
-- Every amount and time is a u64 written in decimal. Lua numbers are doubles, exact only up
-- to 2^53, so u64 values are computed on exactly as two 32-bit limbs {hi, lo}.
local L = 4294967296
local ZERO = {0, 0}
local UMAX = {L - 1, L - 1}
local function U(s)
  local hi, lo = 0, 0
  for i = 1, #s do
    lo = lo * 10 + (string.byte(s, i) - 48)
    local carry = math.floor(lo / L)
    lo = lo - carry * L
    hi = hi * 10 + carry
  end
  return {hi, lo}
end
local function S(x)
  local hi, lo = x[1], x[2]
  if hi == 0 then return string.format('%d', lo) end
  local out = ''
  while hi > 0 or lo > 0 do
    local rh = hi % 10
    hi = (hi - rh) / 10
    local t = rh * L + lo
    local d = t % 10
    lo = (t - d) / 10
    out = string.char(48 + d) .. out
  end
  return out
end
local function le(a, b) return a[1] < b[1] or (a[1] == b[1] and a[2] <= b[2]) end
-- a + b, or nil when it does not fit in a u64 (u64::checked_add).
local function add(a, b)
  local hi, lo = a[1] + b[1], a[2] + b[2]
  if lo >= L then lo = lo - L; hi = hi + 1 end
  if hi >= L then return nil end
  return {hi, lo}
end
-- u64::saturating_add and u64::saturating_sub.
local function sadd(a, b) return add(a, b) or UMAX end
local function ssub(a, b)
  if le(a, b) then return ZERO end
  local hi, lo = a[1] - b[1], a[2] - b[2]
  if lo < 0 then lo = lo + L; hi = hi - 1 end
  return {hi, lo}
end

local BASE = KEYS[1]
local NOW = U(ARGV[1])
local RETENTION = U(ARGV[2])
-- Sorted sets by time (all scores 0, ordered by member): `<time, 20 digits>|<id>`, so times
-- compare exactly as strings. `open`: open holds by expiry; `lapsed`: lapsed holds by when
-- they are forgotten; `counters`: counters by when they are forgotten (if nothing is held).
local OPEN, LAPSED, COUNTERS = BASE .. 'open', BASE .. 'lapsed', BASE .. 'counters'
local function stamp(t, id)
  local s = S(t)
  return string.rep('0', 20 - #s) .. s .. '|' .. id
end
-- The lexical bound below every member stamped at or before `t` ('}' sorts after '|').
local function upto(t)
  local s = S(t)
  return '(' .. string.rep('0', 20 - #s) .. s .. '}'
end
local function id_of(member) return string.sub(member, 22) end
local function hold_key(h) return BASE .. 'h:' .. h end
local function counter_key(c) return BASE .. 'c:' .. c end
local function hgetall(key)
  local flat = redis.call('HGETALL', key)
  if #flat == 0 then return nil end
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end
-- A new counter (or_insert): nothing used or held, forgotten a retention time after `re`.
local function new_counter(c, re, used, held)
  redis.call('HSET', counter_key(c), 'used', S(used), 'held', S(held), 're', re)
  redis.call('ZADD', COUNTERS, 0, stamp(sadd(U(re), RETENTION), c))
end
-- BudgetBook::give_back: each line's amount is no longer held on its counter (if it still
-- exists), and the counter may be forgotten again once its time has come.
local function give_back(rec)
  for i = 1, tonumber(rec.n) do
    local c = rec['c' .. i]
    local ck = counter_key(c)
    local cur = redis.call('HMGET', ck, 'held', 're')
    if cur[1] then
      redis.call('HSET', ck, 'held', S(ssub(U(cur[1]), U(rec['a' .. i]))))
      redis.call('ZADD', COUNTERS, 0, stamp(sadd(U(cur[2]), RETENTION), c))
    end
  end
end
-- BudgetBook::expire.
local function expire()
  for _, m in ipairs(redis.call('ZRANGEBYLEX', OPEN, '-', upto(NOW))) do
    local h = id_of(m)
    local rec = hgetall(hold_key(h))
    if rec and rec.st == 'o' then
      -- Lapsed, and retained from its expiry however late this sweep runs.
      redis.call('HSET', hold_key(h), 'st', 'e')
      give_back(rec)
      redis.call('ZADD', LAPSED, 0, stamp(sadd(U(rec.ex), RETENTION), h))
    end
  end
  redis.call('ZREMRANGEBYLEX', OPEN, '-', upto(NOW))
  for _, m in ipairs(redis.call('ZRANGEBYLEX', LAPSED, '-', upto(NOW))) do
    redis.call('DEL', hold_key(id_of(m)))
  end
  redis.call('ZREMRANGEBYLEX', LAPSED, '-', upto(NOW))
  for _, m in ipairs(redis.call('ZRANGEBYLEX', COUNTERS, '-', upto(NOW))) do
    local ck = counter_key(id_of(m))
    -- A counter still holding something is kept; give_back puts it back in the set.
    if redis.call('HGET', ck, 'held') == '0' then redis.call('DEL', ck) end
  end
  redis.call('ZREMRANGEBYLEX', COUNTERS, '-', upto(NOW))
end
expire()
