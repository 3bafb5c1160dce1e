-- Mirrors AccountBook::release.
-- Loaded by src/store/redis/scripts.rs with include_str!; see it for KEYS and ARGV.
local key = ARGV[4]
expire_due()
local rec, rk = load_rec(key)
if not rec then return done({'unknown'}) end
if rec.st == 's' then return done({'already_settled'}) end
-- Released: a key unique to one request is forgotten, a client's key kept for its retention.
local function mark_released()
  if rec.k == '0' then
    redis.call('DEL', rk)
  else
    redis.call('HSET', rk, 'st', 'r', 'tt', s(NOW))
    redis.call('EXPIRE', rk, s(GC))
  end
end
if rec.st == 'e' and rec.ce == '1' then
  -- Charged at expiry, and the work never ran after all: the charge comes back.
  for i = 1, tonumber(rec.n) do if rec['l' .. i] then prune_counter(rec['m' .. i], rec['ws' .. i]) end end
  uncharge(rec, false)
  mark_released()
  return done({'ok'})
end
if rec.st ~= 'o' then return done({'ok'}) end
release_units(rec)
mark_released()
redis.call('ZREM', B .. ':open', key)
local cr = tonumber(rec.cr)
bal.held = math.max(bal.held - cr, 0)
credit(cr)
dirty = true
journal(NOW, 'release', cr)
return done({'ok'})
