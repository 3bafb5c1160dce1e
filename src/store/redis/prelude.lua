-- Mirrors (shared) AccountBook::expire and Charge::split: state loading, lazy expiry, the split of a charge.
-- Loaded by src/store/redis/scripts.rs with include_str!; see it for KEYS and ARGV.
local B = KEYS[1]
local NOW = tonumber(ARGV[1])
local RETENTION = tonumber(ARGV[2])
local GC = tonumber(ARGV[3])
local MAX = 9007199254740991
-- The journal's bounds come last in ARGV (after each script's own arguments).
local JRET = tonumber(ARGV[#ARGV - 1])
local JMAX = tonumber(ARGV[#ARGV])
local function s(n) return string.format('%d', n) end
local function hgetall(key)
  local flat = redis.call('HGETALL', key)
  if #flat == 0 then return nil end
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end
local bal = {available = 0, held = 0, settled = 0, deposited = 0, overdrawn = 0}
do
  local t = hgetall(B .. ':bal')
  if t then
    bal.available = tonumber(t.available); bal.held = tonumber(t.held)
    bal.settled = tonumber(t.settled); bal.deposited = tonumber(t.deposited)
    bal.overdrawn = tonumber(t.overdrawn or '0')
  end
end
local dirty = false
local function done(reply)
  if dirty then
    redis.call('HSET', B .. ':bal', 'available', s(bal.available), 'held', s(bal.held),
      'settled', s(bal.settled), 'deposited', s(bal.deposited), 'overdrawn', s(bal.overdrawn))
  end
  return reply
end
-- Mirrors journal::Entries::push and expire: one line per entry that moved credit.
local function journal(at, kind, credits, dir, ref, reason)
  if JMAX == 0 or credits == 0 then return end
  local jk = B .. ':j'
  local seq = redis.call('INCR', B .. ':jseq')
  local strings = cjson.encode({r = ref, w = reason})
  redis.call('RPUSH', jk, s(seq) .. '|' .. s(at) .. '|' .. kind .. '|' .. s(credits) .. '|' ..
    (dir or '') .. '|' .. s(bal.available) .. '|' .. strings)
  redis.call('LTRIM', jk, -JMAX, -1)
  while true do
    local first = redis.call('LINDEX', jk, 0)
    if not first then break end
    local t = tonumber(string.match(first, '^%d+|(%d+)|'))
    if t + JRET > NOW then break end
    redis.call('LPOP', jk)
  end
  redis.call('EXPIRE', jk, s(math.max(JRET, GC)))
  redis.call('EXPIRE', B .. ':jseq', s(math.max(JRET, GC)))
end
-- Mirrors AccountBook::credit: credit coming back repays the overdraft first.
local function credit(x)
  local repaid = math.min(x, bal.overdrawn)
  bal.overdrawn = bal.overdrawn - repaid
  bal.available = bal.available + x - repaid
end
local function ckey(meter, start) return B .. ':a:' .. string.len(meter) .. ':' .. meter .. ':' .. start end
local function get_counter(meter, start)
  local c = hgetall(ckey(meter, start))
  if not c then return nil end
  return {used = tonumber(c.used), held = tonumber(c.held), re = tonumber(c.re)}
end
local function put_counter(meter, start, c)
  local k = ckey(meter, start)
  redis.call('HSET', k, 'used', s(c.used), 'held', s(c.held), 're', s(c.re))
  redis.call('EXPIRE', k, s(math.max(c.re - NOW, 0) + GC))
end
-- Forgets a counter whose window is over and holds nothing (done once, before reading).
local function prune_counter(meter, start)
  local c = get_counter(meter, start)
  if c and c.re <= NOW and c.held == 0 then redis.call('DEL', ckey(meter, start)) end
end
local function charge(rec, i)
  return {m = rec['m' .. i], p = tonumber(rec['p' .. i]), pp = tonumber(rec['pp' .. i] or '1'),
    o = rec['o' .. i] == '1',
    a = rec['l' .. i] ~= nil, l = tonumber(rec['l' .. i] or '0'), ws = rec['ws' .. i],
    re = tonumber(rec['re' .. i] or '0')}
end
local function release_units(rec)
  for i = 1, tonumber(rec.n) do
    if rec['l' .. i] then
      local c = get_counter(rec['m' .. i], rec['ws' .. i])
      if c then
        c.held = math.max(c.held - tonumber(rec['u' .. i]), 0)
        redis.call('HSET', ckey(rec['m' .. i], rec['ws' .. i]), 'held', s(c.held))
      end
    end
  end
end
-- Moves each charge's allowance units of `rec` between its counter's held and used (dh and du
-- are -1, 0 or 1), as AccountBook::expire and AccountBook::uncharge do.
local function shift_units(rec, dh, du)
  for i = 1, tonumber(rec.n) do
    if rec['l' .. i] then
      local c = get_counter(rec['m' .. i], rec['ws' .. i])
      if c then
        local u = tonumber(rec['u' .. i])
        c.held = math.max(c.held + dh * u, 0)
        c.used = math.max(c.used + du * u, 0)
        redis.call('HSET', ckey(rec['m' .. i], rec['ws' .. i]), 'held', s(c.held), 'used', s(c.used))
      end
    end
  end
end
-- Mirrors AccountBook::uncharge: a hold charged at expiry leaves `settled` again, for `held`
-- (before a late settlement) or for `available` (a late release).
local function uncharge(rec, rehold)
  local cr = tonumber(rec.cr)
  if rehold then shift_units(rec, 1, -1) else shift_units(rec, 0, -1) end
  bal.settled = math.max(bal.settled - cr, 0)
  if rehold then bal.held = bal.held + cr else credit(cr) end
  dirty = true
  journal(NOW, 'release', cr)
end
local function expire_due()
  local due = redis.call('ZRANGEBYSCORE', B .. ':open', '-inf', s(NOW))
  if #due == 0 then return end
  -- In expiry order, as the book releases them (each one journaled as it comes back).
  for _, k in ipairs(due) do
    local rk = B .. ':r:' .. k
    local rec = hgetall(rk)
    if rec and rec.st == 'o' then
      local cr = tonumber(rec.cr)
      redis.call('HSET', rk, 'st', 'e', 'tt', rec.ex)
      redis.call('EXPIRE', rk, s(GC))
      bal.held = math.max(bal.held - cr, 0)
      if rec.ce == '1' then
        -- OnExpiry::Charge: the work ran on this hold's reply; its estimate is charged.
        shift_units(rec, -1, 1)
        bal.settled = bal.settled + cr
        journal(tonumber(rec.ex), 'settle', cr)
      else
        release_units(rec)
        credit(cr)
        journal(tonumber(rec.ex), 'expiry', cr)
      end
    end
  end
  dirty = true
  redis.call('ZREMRANGEBYSCORE', B .. ':open', '-inf', s(NOW))
end
-- A reservation record, or nil if absent or finished longer ago than the retention time.
local function load_rec(k)
  local rk = B .. ':r:' .. k
  local rec = hgetall(rk)
  if rec and rec.st ~= 'o' and tonumber(rec.tt) + RETENTION <= NOW then
    redis.call('DEL', rk)
    return nil, rk
  end
  return rec, rk
end
-- ceil(p × units / pp), or nil above MAX. Every operand is an integer ≤ 2^53 − 1, so the
-- product is exact whenever it is ≤ MAX; the quotient is corrected to the exact ceiling.
local function price(p, units, pp)
  local a = p * units
  if a > MAX or pp < 1 then return nil end
  local q = math.floor(a / pp)
  if q * pp > a then q = q - 1 end
  if q * pp < a then q = q + 1 end
  return q
end
-- Charge::split: 'ok', allowance units, credits | 'quota', limit, taken | 'max'
local function split(c, units, taken)
  local limit = 0
  if c.a then limit = c.l end
  local free = math.max(limit - taken, 0)
  local au = math.min(units, free)
  local rest = units - au
  if rest == 0 then return 'ok', au, 0 end
  if not c.o then
    if (not c.a) and c.p == 0 then return 'ok', au, 0 end
    return 'quota', limit, taken
  end
  local cr = price(c.p, rest, c.pp)
  if cr then return 'ok', au, cr end
  return 'max'
end
-- A window that is over and forgotten has nothing left to give (AccountBook::taken).
local function taken_of(c)
  if not c.a then return 0 end
  local t = get_counter(c.m, c.ws)
  if not t then
    if c.re <= NOW then return c.l end
    return 0
  end
  return t.used + t.held
end
local function settlement_reply(tag, rec)
  local r = {tag, tonumber(rec.sc), tonumber(rec.saa), tonumber(rec.ssc), tonumber(rec.n)}
  for i = 1, tonumber(rec.n) do r[#r + 1] = tonumber(rec['sa' .. i]) end
  r[#r + 1] = tonumber(rec.sk)
  for j = 1, tonumber(rec.sk) do
    r[#r + 1] = rec['skm' .. j]; r[#r + 1] = tonumber(rec['sku' .. j])
  end
  r[#r + 1] = tonumber(rec.sun or '0')
  for i = 1, tonumber(rec.n) do r[#r + 1] = tonumber(rec['su' .. i] or '-1') end
  return r
end
local function bal_reply(tag)
  return {tag, bal.available, bal.held, bal.settled, bal.deposited, bal.overdrawn}
end
