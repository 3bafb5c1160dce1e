-- Mirrors MemoryPlanStore::put_subscription_if (compare the sync mark, then write).
-- Loaded by src/store/redis/scripts.rs with include_str!; see it for KEYS and ARGV.
local cur = redis.call('GET', KEYS[1])
local mark = nil
if cur then
  local ok, sub = pcall(cjson.decode, cur)
  if not ok or type(sub) ~= 'table' then
    return redis.error_reply('tower-402: unreadable subscription')
  end
  if type(sub.synced) == 'table' then mark = sub.synced end
end
if ARGV[2] == '0' then
  if mark ~= nil then return 0 end
else
  if mark == nil then return 0 end
  if mark.source ~= ARGV[3] or mark.event_id ~= ARGV[5] then return 0 end
  if type(mark.event_created) ~= 'number' then return 0 end
  if string.format('%d', mark.event_created) ~= ARGV[4] then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
