-- Write one computed batch of ONE source partition to its shard, atomically and fenced.
--
-- KEYS[1]     {hw:pP}:offsets      hash: topic -> next offset to apply
-- KEYS[2]     {hw:pP}:pit:<topic>  the replay cache (hash: first offset -> entry)
-- KEYS[3]     {hw:pP}:writer       the token of the last write (set to ARGV[8])
-- KEYS[4..]   {hw:pP}:<entity>     the entities the batch changed (U of them), then
--             {hw:pP}:~h2:<entity>  their histories, in the same order
-- ARGV[1]     topic
-- ARGV[2]     expected next offset: what the batch was computed from (read_own.lua)
-- ARGV[3]     the new next offset (the batch's largest applied offset + 1)
-- ARGV[4]     the state fields, comma separated, 't' last
-- ARGV[5]     new states: per entity key, one little-endian double per field
-- ARGV[6]     the replay-cache entry for this batch (opaque bytes, written by the caller)
-- ARGV[7]     replay cache size: how many recent batches keep their entries
-- ARGV[8]     a fresh random token naming the shard's new state (features/shard_cache.py)
-- ARGV[9]     per entity: how many history entries it gets, little-endian int32
-- ARGV[10]    those entries, (ts, impressions, clicks) little-endian doubles, key by key,
--             offset order (impressions 0: a click counted at its own time)
-- ARGV[11]    the half-lives, comma separated (the order of the state fields)
-- ARGV[12]    K: history entries kept per entity, at least K and fewer than 2K
--
-- Returns {1, next_offset} when written, {0, stored next offset} when the fence failed.
--
-- The fence: the caller computed the new states from the shard as it was when the next
-- offset was ARGV[2]. Only this script moves the next offset, and it always moves it
-- forward, so an unchanged next offset means nobody wrote the shard in between. If it
-- moved (another worker took the partition over during a rebalance, or a zombie worker
-- raced us), nothing is written: the caller re-reads and recomputes. Writing each
-- entity's final state and advancing the offset in one script is what keeps counter
-- updates idempotent per (topic, partition, offset).
--
-- Each entity's history (features/asof.py) is a string key beside it: a head state (the
-- fields' doubles, t last, NaN t: empty) then its latest (ts, n, c) entries in offset
-- order, appended here (APPEND: no read). An entity without one (written before
-- histories existed) starts it with its old state as the head. Whenever it holds 2K
-- entries or more, the oldest K fold into the head (repeatedly), exactly as the state
-- itself is updated (decay to a newer event's time; an older one adds decayed). So the
-- entries kept depend only on how many events the entity had, not on batch boundaries.
local topic = ARGV[1]
local cur = redis.call('HGET', KEYS[1], topic) or '0'
if tonumber(cur) ~= tonumber(ARGV[2]) then return {0, cur} end
local fields = {}
for f in string.gmatch(ARGV[4], '[^,]+') do fields[#fields + 1] = f end
local nf = #fields
local fmt = '<' .. string.rep('d', nf)
local blob = ARGV[5]
local pos = 1
local args = {}
for j = 1, nf do args[2 * j - 1] = fields[j] end
local format = string.format
local hls = {}
for h in string.gmatch(ARGV[11], '[^,]+') do hls[#hls + 1] = tonumber(h) end
local keep_hist = tonumber(ARGV[12])
local nan = 0 / 0
-- fold2 is fold for two half-lives (the default counters) on locals instead of a
-- table: the same operations in the same order, so the same bits, in about half the
-- time (every history entry is folded once: ~3 per click event with the default counters).
local function fold2(hist, m)
  local n, c, i1, c1, i2, c2, t, hp = struct.unpack(fmt, hist)
  local h1, h2 = hls[1], hls[2]
  local unpack = struct.unpack
  for _ = 1, m do
    local ts, imp, lab
    ts, imp, lab, hp = unpack('<ddd', hist, hp)
    if t ~= t then
      n, c, i1, c1, i2, c2 = 0, 0, 0, 0, 0, 0
      t = ts
    end
    if ts >= t then
      local f1 = 2 ^ (-(ts - t) / h1)
      local f2 = 2 ^ (-(ts - t) / h2)
      i1 = i1 * f1 + imp
      c1 = c1 * f1 + lab
      i2 = i2 * f2 + imp
      c2 = c2 * f2 + lab
      t = ts
    else
      local w1 = 2 ^ (-(t - ts) / h1)
      local w2 = 2 ^ (-(t - ts) / h2)
      i1 = i1 + imp * w1
      c1 = c1 + lab * w1
      i2 = i2 + imp * w2
      c2 = c2 + lab * w2
    end
    n = n + imp
    c = c + lab
  end
  return struct.pack(fmt, n, c, i1, c1, i2, c2, t) .. string.sub(hist, hp)
end
local function fold(hist, m)
  if nf == 7 and #hls == 2 then return fold2(hist, m) end
  local h = {struct.unpack(fmt, hist)}
  local hp = h[nf + 1]
  local t = h[nf]
  for _ = 1, m do
    local ts, imp, lab
    ts, imp, lab, hp = struct.unpack('<ddd', hist, hp)
    if t ~= t then
      for j = 1, nf - 1 do h[j] = 0 end
      t = ts
    end
    if ts >= t then
      for j = 1, #hls do
        local f = 2 ^ (-(ts - t) / hls[j])
        h[1 + 2 * j] = h[1 + 2 * j] * f + imp
        h[2 + 2 * j] = h[2 + 2 * j] * f + lab
      end
      t = ts
    else
      for j = 1, #hls do
        local w = 2 ^ (-(t - ts) / hls[j])
        h[1 + 2 * j] = h[1 + 2 * j] + imp * w
        h[2 + 2 * j] = h[2 + 2 * j] + lab * w
      end
    end
    h[1] = h[1] + imp
    h[2] = h[2] + lab
  end
  h[nf] = t
  return struct.pack(fmt, unpack(h, 1, nf)) .. string.sub(hist, hp)
end
local epos = 1
local U = (#KEYS - 3) / 2
for i = 4, 3 + U do
  local v = {struct.unpack(fmt, blob, pos)}
  pos = v[nf + 1]
  local cnt = struct.unpack('<i4', ARGV[9], 4 * (i - 4) + 1)
  local hk = KEYS[i + U]
  local add = string.sub(ARGV[10], epos, epos + 24 * cnt - 1)
  epos = epos + 24 * cnt
  local size
  if redis.call('EXISTS', hk) == 1 then
    size = redis.call('APPEND', hk, add)
  else
    local raw = redis.call('HMGET', KEYS[i], unpack(fields))
    local old = {}
    for j = 1, nf - 1 do old[j] = tonumber(raw[j]) or 0 end
    old[nf] = tonumber(raw[nf]) or nan
    local h = struct.pack(fmt, unpack(old)) .. add
    redis.call('SET', hk, h)
    size = #h
  end
  local k = (size - 8 * nf) / 24
  local m = 0
  if keep_hist == 0 then m = k elseif k >= 2 * keep_hist then
    m = keep_hist * (math.floor(k / keep_hist) - 1)
  end
  if m > 0 then redis.call('SET', hk, fold(redis.call('GET', hk), m)) end
  for j = 1, nf do args[2 * j] = format('%.17g', v[j]) end
  redis.call('HSET', KEYS[i], unpack(args))
end
local keep = tonumber(ARGV[7])
if keep > 0 then
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[6])
  local firsts = redis.call('HKEYS', KEYS[2])
  if #firsts > keep then
    local nums = {}
    for i, f in ipairs(firsts) do nums[i] = tonumber(f) end
    table.sort(nums)
    for i = 1, #nums - keep do redis.call('HDEL', KEYS[2], string.format('%d', nums[i])) end
  end
end
redis.call('HSET', KEYS[1], topic, ARGV[3])
redis.call('SET', KEYS[3], ARGV[8])
return {1, ARGV[3]}
