-- Mirrors AccountBook::settle.
-- Loaded by src/store/redis/scripts.rs with include_str!; see it for KEYS and ARGV.
local key, policy, m = ARGV[4], ARGV[5], tonumber(ARGV[6])
local usage = {}
for j = 1, m do usage[ARGV[5 + 2 * j]] = tonumber(ARGV[6 + 2 * j]) end
expire_due()
local rec, rk = load_rec(key)
if not rec then return done({'unknown'}) end
local n = tonumber(rec.n)
local held_credits = 0
local held_units = {}
local lapsed = false
if rec.st == 's' then return done({'already_settled'}) end
if rec.st ~= 'o' and rec.st ~= 'e' then return done({'already_released'}) end
for i = 1, n do if rec['l' .. i] then prune_counter(rec['m' .. i], rec['ws' .. i]) end end
if rec.st == 'e' and rec.ce == '1' then
  -- Charged at expiry: that charge becomes a hold again, settled below as if never lapsed.
  uncharge(rec, true)
end
if rec.st == 'o' or rec.ce == '1' then
  held_credits = tonumber(rec.cr)
  for i = 1, n do held_units[i] = tonumber(rec['u' .. i]) end
else
  lapsed = true
  for i = 1, n do held_units[i] = 0 end
end
local cost = 0
local f = {'st', 's', 'tt', s(NOW)}
local short = {}
for i = 1, n do
  local c = charge(rec, i)
  local units = usage[c.m] or 0
  local taken = math.max(taken_of(c) - held_units[i], 0)
  local kind, au, cr = split(c, units, taken)
  local over = 0
  if kind == 'quota' then
    local free = 0
    if c.a then free = math.max(c.l - taken, 0) end
    au = math.min(units, free)
    cr = 0
    over = units - au
  elseif kind == 'max' then
    au = 0
    cr = MAX
  end
  if c.a then
    local t = get_counter(c.m, c.ws) or {used = 0, held = 0, re = c.re}
    t.held = math.max(t.held - held_units[i], 0)
    t.used = t.used + au
    put_counter(c.m, c.ws, t)
    f[#f + 1] = 'su' .. i; f[#f + 1] = s(t.used)
  end
  if over > 0 then short[#short + 1] = {c.m, over} end
  f[#f + 1] = 'sa' .. i; f[#f + 1] = s(au)
  -- Counted at most MAX, as AccountBook::charge_usage does (exact: both terms are <= MAX).
  cost = math.min(cost + cr, MAX)
end
local from_hold = math.min(cost, held_credits)
local beyond = cost - from_hold
local from_available = 0
-- 'draw', 'cap' or 'od:<limit>' (OverEstimate::Overdraft: the most the account may owe).
local od = tonumber(string.match(policy, '^od:(%d+)$') or '-1')
bal.held = math.max(bal.held - held_credits, 0)
credit(held_credits - from_hold)
-- A lapsed hold held nothing: its late settlement draws what it can, whatever the policy.
if policy ~= 'cap' or lapsed then from_available = math.min(beyond, bal.available) end
bal.available = bal.available - from_available
local rest = beyond - from_available
local from_overdraft = 0
if od > 0 then
  -- Up to the limit, and never past MAX in all (AccountBook::charge_usage).
  local headroom = math.max(MAX - bal.deposited - bal.overdrawn, 0)
  from_overdraft = math.max(math.min(rest, math.min(od, MAX) - bal.overdrawn, headroom), 0)
end
bal.overdrawn = bal.overdrawn + from_overdraft
local charged = from_hold + from_available + from_overdraft
bal.settled = bal.settled + charged
dirty = true
journal(NOW, 'settle', charged)
journal(NOW, 'shortfall', rest - from_overdraft)
for _, v in ipairs({'sc', s(charged), 'saa', s(bal.available), 'sun', s(bal.available + bal.held), 'ssc', s(rest - from_overdraft), 'sk', s(#short)}) do
  f[#f + 1] = v
end
for j, p in ipairs(short) do
  f[#f + 1] = 'skm' .. j; f[#f + 1] = p[1]; f[#f + 1] = 'sku' .. j; f[#f + 1] = s(p[2])
end
redis.call('HSET', rk, unpack(f))
redis.call('ZREM', B .. ':open', key)
local reply = settlement_reply('settled', hgetall(rk))
-- A key unique to one request never comes back: forget it now (records written before
-- the flag existed have none and are kept, as they always were).
if rec.k == '0' then redis.call('DEL', rk) else redis.call('EXPIRE', rk, s(GC)) end
return done(reply)
