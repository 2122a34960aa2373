-- The duplicate event-id window of one (topic, partition): first position of each id,
-- in two generations (hashes id -> "offset:sub"). New ids go into the current one; once
-- it holds `capacity` ids it becomes the previous one and the old previous one is
-- dropped whole, so the window holds at least the `capacity` newest recorded ids (and at
-- most twice that plus a batch) without a per-id eviction index.
-- KEYS[1]: hash, the current generation
-- KEYS[2]: hash, the previous generation
-- KEYS[3]: the eviction index of the window's former layout (a zset), dropped at the
--          first rotation
-- ARGV[1]: capacity (ids per generation)
-- ARGV[2]: the batch's ids, concatenated, in stream order
-- ARGV[3]: their byte lengths, one little-endian int32 each
-- ARGV[4]: their positions, (offset, sub) as little-endian doubles each (exact below 2^53)
-- Returns {i, first, ...} for the duplicates only (i 1-based): ids first seen at
-- another position. New ids, and ids seen again at the same position (a replay of the
-- same message), are recorded and not returned.
local cap = tonumber(ARGV[1])
local ids, lens, posb = ARGV[2], ARGV[3], ARGV[4]
local unpack_, format, sub_, call = struct.unpack, string.format, string.sub, redis.call
local cur, prev = KEYS[1], KEYS[2]
local out = {}
local at = 1
for i = 1, #lens / 4 do
  local len = unpack_('<i4', lens, 4 * i - 3)
  local id = sub_(ids, at, at + len - 1)
  at = at + len
  local pos = format('%d:%d', unpack_('<dd', posb, 16 * i - 15))
  local first = call('HGET', prev, id)
  if not first then
    if call('HSETNX', cur, id, pos) == 0 then first = call('HGET', cur, id) end
  end
  if first and first ~= pos then
    out[#out + 1] = i
    out[#out + 1] = first
  end
end
if call('HLEN', cur) >= cap then
  call('UNLINK', prev, KEYS[3])
  call('RENAME', cur, prev)
end
return out
