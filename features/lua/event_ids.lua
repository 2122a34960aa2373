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
--
-- The commands go per chunk of ids, not per id (HMGET on each generation, one HSET of
-- the new ids): what an id finds is what the per-id HGET previous / HSETNX current in
-- stream order found, because the previous generation does not change during the call
-- and an id new to both generations finds the position this batch recorded first
-- (`seen`). A chunk stays below Lua's 8000-value stack for a call's arguments.
local cap = tonumber(ARGV[1])
local ids, lens, posb = ARGV[2], ARGV[3], ARGV[4]
local unpack_, format, sub_, call, tunpack = struct.unpack, string.format, string.sub, redis.call, unpack
local cur, prev = KEYS[1], KEYS[2]
local CHUNK = 3000
local n = #lens / 4
local id_of = {}
local at = 1
for i = 1, n do
  local len = unpack_('<i4', lens, 4 * i - 3)
  id_of[i] = sub_(ids, at, at + len - 1)
  at = at + len
end
-- first[i]: the position id i was recorded at before this call (previous generation
-- first, as the per-id lookups went), or nil
local first = {}
local function lookup(key, list, which)
  -- looks list[s..e] up; which[j], if given, is the index in the batch of list[j]
  for s = 1, #list, CHUNK do
    local e = math.min(s + CHUNK - 1, #list)
    local r = call('HMGET', key, tunpack(list, s, e))
    for j = s, e do
      local v = r[j - s + 1]
      if v then first[which and which[j] or j] = v end
    end
  end
end
if call('EXISTS', prev) == 1 then lookup(prev, id_of, nil) end
if call('EXISTS', cur) == 1 then
  local rest, rest_ids = {}, {}
  for i = 1, n do
    if not first[i] then
      rest[#rest + 1] = i
      rest_ids[#rest_ids + 1] = id_of[i]
    end
  end
  lookup(cur, rest_ids, rest)
end
-- positions as format('%d:%d', offset, sub) would give them, the offset's text made once
-- per run of equal offsets (an envelope) and each sub's text once
local seen, new, out = {}, {}, {}
local last_off, off_text, sub_text = nil, nil, {}
for i = 1, n do
  local off, sb = unpack_('<dd', posb, 16 * i - 15)
  if off ~= last_off then
    last_off, off_text = off, format('%d', off) .. ':'
  end
  local st = sub_text[sb]
  if not st then
    st = format('%d', sb)
    sub_text[sb] = st
  end
  local pos = off_text .. st
  local f = first[i]
  if not f then
    local id = id_of[i]
    f = seen[id]
    if not f then
      seen[id] = pos
      new[#new + 1] = id
      new[#new + 1] = pos
    end
  end
  if f and f ~= pos then
    out[#out + 1] = i
    out[#out + 1] = f
  end
end
for s = 1, #new, 2 * CHUNK do
  call('HSET', cur, tunpack(new, s, math.min(s + 2 * CHUNK - 1, #new)))
end
if call('HLEN', cur) >= cap then
  call('UNLINK', prev, KEYS[3])
  call('RENAME', cur, prev)
end
return out
