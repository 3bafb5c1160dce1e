-- Mirrors BudgetBook::settle (src/budget/store.rs): ends the hold, open or lapsed, and counts
-- on each line what the request used (BudgetLine::used_by).
-- ARGV (after the prelude's): 3 hold id, 4 credits charged, 5 k, then k pairs of meter name
-- and units used (each meter once, its units already summed, saturating).
-- Reply: 1 settled, 0 no hold to settle.
local h = ARGV[3]
local hk = hold_key(h)
local rec = hgetall(hk)
if not rec then return 0 end
if rec.st == 'o' then
  give_back(rec)
  redis.call('ZREM', OPEN, stamp(U(rec.ex), h))
else
  redis.call('ZREM', LAPSED, stamp(sadd(U(rec.ex), RETENTION), h))
end
redis.call('DEL', hk)
local units = {}
for j = 1, tonumber(ARGV[5]) do units[ARGV[4 + 2 * j]] = ARGV[5 + 2 * j] end
for i = 1, tonumber(rec.n) do
  local by = ARGV[4]
  local m = rec['m' .. i]
  if m then by = units[m] or '0' end
  local c = rec['c' .. i]
  local used = redis.call('HGET', counter_key(c), 'used')
  if used then
    -- Charged work counts in full, even past the budget.
    redis.call('HSET', counter_key(c), 'used', S(sadd(U(used), U(by))))
  else
    new_counter(c, rec['r' .. i], U(by), ZERO)
  end
end
return 1
