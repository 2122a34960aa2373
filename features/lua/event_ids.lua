-- The duplicate event-id window of one (topic, partition): first position of each id.
-- KEYS[1]: hash  id -> "offset:sub" where the id was first seen
-- KEYS[2]: zset  id -> score of that position (oldest positions are evicted first)
-- ARGV[1]: capacity (ids kept); then triples (id, "offset:sub", score), in stream order.
-- Returns one value per id: 0 (new, or the same position again: a replay) or the
-- position the id was first seen at (a duplicate).
local cap = tonumber(ARGV[1])
local out = {}
local n = 0
for i = 2, #ARGV, 3 do
  local id, pos = ARGV[i], ARGV[i + 1]
  local first = redis.call('HGET', KEYS[1], id)
  n = n + 1
  if not first then
    redis.call('HSET', KEYS[1], id, pos)
    redis.call('ZADD', KEYS[2], ARGV[i + 2], id)
    out[n] = 0
  elseif first == pos then
    out[n] = 0
  else
    out[n] = first
  end
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
