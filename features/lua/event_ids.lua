-- The duplicate event-id window of one (topic, partition): first position of each id.
-- KEYS[1]: hash  id -> "offset:sub" where the id was first seen
-- KEYS[2]: zset  id -> score of that position (oldest positions are evicted first)
-- ARGV[1]: capacity (ids kept); then triples (id, "offset:sub", score), in stream order.
-- Returns one value per id: 0 (new, or the same position again: a replay) or the
-- position the id was first seen at (a duplicate).
local cap = tonumber(ARGV[1])
local out = {}
local added = {}
local n = 0
for i = 2, #ARGV, 3 do
  local id, pos = ARGV[i], ARGV[i + 1]
  n = n + 1
  if redis.call('HSETNX', KEYS[1], id, pos) == 1 then
    added[#added + 1] = ARGV[i + 2]
    added[#added + 1] = id
    out[n] = 0
  else
    local first = redis.call('HGET', KEYS[1], id)
    if first == pos then out[n] = 0 else out[n] = first end
  end
end
for s = 1, #added, 2000 do
  redis.call('ZADD', KEYS[2], unpack(added, s, math.min(s + 1999, #added)))
end
local excess = redis.call('ZCARD', KEYS[2]) - cap
while excess > 0 do
  local step = math.min(excess, 1000)
  local old = redis.call('ZRANGE', KEYS[2], 0, step - 1)
  redis.call('HDEL', KEYS[1], unpack(old))
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, step - 1)
  excess = excess - step
end
return out
