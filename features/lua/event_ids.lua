-- The duplicate event-id window of one (topic, partition): first position of each id.
-- KEYS[1]: hash  id -> "offset:sub" where the id was first seen
-- KEYS[2]: zset  id -> score of that position, offset * 2^20 + min(sub, 2^20 - 1)
--          (oldest positions are evicted first)
-- ARGV[1]: capacity (ids kept)
-- ARGV[2]: the batch's ids, concatenated, in stream order
-- ARGV[3]: their byte lengths, one little-endian int32 each
-- ARGV[4]: their positions, (offset, sub) as little-endian doubles each (exact below 2^53)
-- The 2^20 sub slots are features.event_ids.SUB_SLOTS.
-- Returns {i, first, ...} for the duplicates only (i 1-based): ids first seen at
-- another position. New ids, and ids seen again at the same position (a replay of the
-- same message), are recorded and not returned.
local cap = tonumber(ARGV[1])
local ids, lens, posb = ARGV[2], ARGV[3], ARGV[4]
local unpack_, format, sub_ = struct.unpack, string.format, string.sub
local slots = 1048576
local out = {}
local added = {}
local at = 1
for i = 1, #lens / 4 do
  local len = unpack_('<i4', lens, 4 * i - 3)
  local id = sub_(ids, at, at + len - 1)
  at = at + len
  local off, sub = unpack_('<dd', posb, 16 * i - 15)
  local pos = format('%d:%d', off, sub)
  if redis.call('HSETNX', KEYS[1], id, pos) == 1 then
    added[#added + 1] = format('%d', off * slots + math.min(sub, slots - 1))
    added[#added + 1] = id
  else
    local first = redis.call('HGET', KEYS[1], id)
    if first ~= pos then
      out[#out + 1] = i
      out[#out + 1] = first
    end
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
