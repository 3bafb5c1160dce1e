-- Mirrors AccountBook::reserve.
-- Loaded by src/store/redis/scripts.rs with include_str!; see it for KEYS and ARGV.
local key, fp, ex, ttl, n = ARGV[4], ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local keep = ARGV[9 + n * 9] or '1'
local ce = ARGV[10 + n * 9] or '0'
local att = ARGV[11 + n * 9] or '0'
local ch = {}
for i = 1, n do
  local b = 8 + (i - 1) * 9
  ch[i] = {m = ARGV[b + 1], units = tonumber(ARGV[b + 2]), p = tonumber(ARGV[b + 3]),
    pp = tonumber(ARGV[b + 4]), o = ARGV[b + 5] == '1', a = ARGV[b + 6] == '1',
    l = tonumber(ARGV[b + 7]), ws = ARGV[b + 8], re = tonumber(ARGV[b + 9])}
end
expire_due()
local rec, rk = load_rec(key)
if rec then
  if rec.fp ~= fp then return done({'conflict'}) end
  if rec.st == 'o' then
    -- The same attempt again (its reply was lost): its reservation back, as
    -- AccountBook::reservation_of builds it.
    if att ~= '0' and rec.at == att then
      local rn = tonumber(rec.n)
      local r = {'reserved', tonumber(rec.cr), tonumber(rec.ex), bal.available, rn}
      for i = 1, rn do r[#r + 1] = tonumber(rec['u' .. i]) end
      for i = 1, rn do
        if rec['l' .. i] then
          local t = get_counter(rec['m' .. i], rec['ws' .. i]) or {used = 0, held = 0}
          r[#r + 1] = math.max(tonumber(rec['l' .. i]) - (t.used + t.held), 0)
        else
          r[#r + 1] = -1
        end
      end
      return done(r)
    end
    return done({'in_progress'})
  end
  if rec.st == 's' then return done(settlement_reply('completed', rec)) end
  -- Charged at expiry: its work ran, so a retry does not run it again (the provisional
  -- settlement, as AccountBook's Record::provisional_settlement).
  if rec.st == 'e' and rec.ce == '1' then
    local rn = tonumber(rec.n)
    local r = {'completed', tonumber(rec.cr), 0, 0, rn}
    for i = 1, rn do r[#r + 1] = tonumber(rec['u' .. i]) end
    r[#r + 1] = 0
    r[#r + 1] = 0
    for _ = 1, rn do r[#r + 1] = -1 end
    return done(r)
  end
end
for i = 1, n do if ch[i].a then prune_counter(ch[i].m, ch[i].ws) end end
local credits = 0
local units = {}
for i = 1, n do
  local c = ch[i]
  local kind, x, y = split(c, c.units, taken_of(c))
  if kind == 'quota' then return done({'quota', i, y}) end
  if kind == 'max' then return done({'insufficient', bal.available, MAX}) end
  credits = credits + y
  if credits > MAX then return done({'range'}) end
  units[i] = x
end
if credits > bal.available then return done({'insufficient', bal.available, credits}) end
bal.available = bal.available - credits
bal.held = bal.held + credits
dirty = true
local left = {}
for i = 1, n do
  local c = ch[i]
  if c.a then
    local t = get_counter(c.m, c.ws) or {used = 0, held = 0, re = c.re}
    t.held = t.held + units[i]
    put_counter(c.m, c.ws, t)
    left[i] = math.max(c.l - (t.used + t.held), 0)
  else
    left[i] = -1
  end
end
redis.call('DEL', rk)
local f = {'fp', fp, 'st', 'o', 'cr', s(credits), 'ex', s(ex), 'tt', s(NOW), 'n', s(n), 'k', keep, 'ce', ce, 'at', att}
for i = 1, n do
  local c = ch[i]
  local j = tostring(i)
  for _, v in ipairs({'m' .. j, c.m, 'p' .. j, s(c.p), 'pp' .. j, s(c.pp), 'o' .. j, c.o and '1' or '0', 'u' .. j, s(units[i])}) do
    f[#f + 1] = v
  end
  if c.a then
    for _, v in ipairs({'l' .. j, s(c.l), 'ws' .. j, c.ws, 're' .. j, s(c.re)}) do f[#f + 1] = v end
  end
end
redis.call('HSET', rk, unpack(f))
-- No expiry on an open record: only it knows what to give back when its hold lapses, so it
-- lives until it is settled, released or expired by a later operation (which set one).
redis.call('ZADD', B .. ':open', s(ex), key)
local r = {'reserved', credits, ex, bal.available, n}
for i = 1, n do r[#r + 1] = units[i] end
for i = 1, n do r[#r + 1] = left[i] end
return done(r)
