-- Mirrors BudgetBook::release (src/budget/store.rs): gives an open hold back.
-- ARGV (after the prelude's): 3 hold id. Reply: 1 released, 0 no open hold.
local h = ARGV[3]
local rec = hgetall(hold_key(h))
if not rec or rec.st ~= 'o' then return 0 end
give_back(rec)
redis.call('ZREM', OPEN, stamp(U(rec.ex), h))
redis.call('DEL', hold_key(h))
return 1
