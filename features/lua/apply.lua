-- Apply one batch of click events of ONE source partition to its shard, atomically.
--
-- KEYS[1]     {hw:pP}:offsets      hash: topic -> next offset to apply
-- KEYS[2..n+1] {hw:pP}:<entity>     entity hashes (fields n, c, n@<h>, c@<h>, t)
-- ARGV[1]     topic
-- ARGV[2]     half-lives, comma separated, as written in field names ("3600,86400")
-- ARGV[3]     events: per event 5 little-endian doubles (offset, sub, ts, label, nrefs),
--             sorted by (offset, sub)
-- ARGV[4]     refs: per reference one little-endian int32, the entity's index (1-based)
--             into KEYS[2..]
-- ARGV[5]     replay cache size: how many recent batches keep their pre-event states
-- KEYS[2 + #entities]  {hw:pP}:pit:<topic>  the replay cache (hash: first offset -> entry)
--
-- Returns {flags, pre, late, duplicates, next_offset}:
--   flags  one byte per event: 'a' applied, 'l' applied late, 'r' already applied before
--          and its pre-event state restored from the replay cache, 's' already applied
--          and no longer in the cache (its pre-event state is lost: zeros)
--   pre    per reference, the entity state just BEFORE the event (doubles n, c, then
--          (n, c) per half-life decayed to the event time)
--
-- Why a replay cache: a worker killed after this script ran but before it produced the
-- batch's training rows replays the same messages; the counters must not move again, but
-- the rows must still be produced with the features they had the first time.
--
-- Idempotency: an event is applied iff its offset >= the stored next offset, and the
-- next offset moves to max(offset) + 1 in the same atomic script, so a replayed message
-- is skipped whole. Late events (ts < the entity's t) add to totals and are added to the
-- decayed sums with weight 2^(-(t - ts)/h): exact, and t never moves backwards.

local topic = ARGV[1]
local hl, hname = {}, {}
for h in string.gmatch(ARGV[2], '[^,]+') do
  hname[#hname + 1] = h
  hl[#hl + 1] = tonumber(h)
end
local H = #hl
local W = 2 + 2 * H
local fields = {'n', 'c'}
for j = 1, H do
  fields[#fields + 1] = 'n@' .. hname[j]
  fields[#fields + 1] = 'c@' .. hname[j]
end
fields[#fields + 1] = 't'
local fmt = '<' .. string.rep('d', W)
local LN2 = math.log(2)

local nxt = tonumber(redis.call('HGET', KEYS[1], topic) or '0')

local state = {}
local function load(k)
  local raw = redis.call('HMGET', KEYS[k + 1], unpack(fields))
  local s = {}
  for i = 1, W do s[i] = tonumber(raw[i]) or 0 end
  s.t = tonumber(raw[W + 1])  -- nil when never written
  state[k] = s
  return s
end

local ev, refs = ARGV[3], ARGV[4]
local keep = tonumber(ARGV[5])
local pitkey = KEYS[#KEYS]
local nev = #ev / 40
local flags, pre = {}, {}
local zeros = string.rep('\0', 8 * W)
local pos, rpos = 1, 1
local late, dup, maxoff = 0, 0, -1
local cache = nil
local function load_cache()
  cache = {}
  local entries = redis.call('HVALS', pitkey)
  for _, blob in ipairs(entries) do
    local m, p = struct.unpack('<d', blob, 1)
    local body = 1 + 8 + 24 * m
    for _ = 1, m do
      local o, sb, nr
      o, sb, nr, p = struct.unpack('<ddd', blob, p)
      cache[o .. ':' .. sb] = {blob, body, nr}
      body = body + 8 * W * nr
    end
  end
end
local applied_meta, applied_pre = {}, {}
for e = 1, nev do
  local off, sub, ts, label, nr
  off, sub, ts, label, nr, pos = struct.unpack('<ddddd', ev, pos)
  if off < nxt then
    dup = dup + 1
    rpos = rpos + 4 * nr
    if cache == nil then load_cache() end
    local hit = cache[off .. ':' .. sub]
    if hit and hit[3] == nr then
      flags[e] = 'r'
      pre[#pre + 1] = string.sub(hit[1], hit[2], hit[2] + 8 * W * nr - 1)
    else
      flags[e] = 's'
      for _ = 1, nr do pre[#pre + 1] = zeros end
    end
  else
    applied_meta[#applied_meta + 1] = struct.pack('<ddd', off, sub, nr)
    local first = #pre + 1
    if off > maxoff then maxoff = off end
    local is_late = false
    for _ = 1, nr do
      local k
      k, rpos = struct.unpack('<i4', refs, rpos)
      local s = state[k] or load(k)
      local t = s.t or ts
      local dt = ts - t
      if dt >= 0 then
        for j = 1, H do
          local f = math.exp(-dt * LN2 / hl[j])
          s[1 + 2 * j] = s[1 + 2 * j] * f
          s[2 + 2 * j] = s[2 + 2 * j] * f
        end
        pre[#pre + 1] = struct.pack(fmt, unpack(s, 1, W))
        s[1] = s[1] + 1
        s[2] = s[2] + label
        for j = 1, H do
          s[1 + 2 * j] = s[1 + 2 * j] + 1
          s[2 + 2 * j] = s[2 + 2 * j] + label
        end
        s.t = ts
      else
        is_late = true
        pre[#pre + 1] = struct.pack(fmt, unpack(s, 1, W))
        s[1] = s[1] + 1
        s[2] = s[2] + label
        for j = 1, H do
          local f = math.exp(dt * LN2 / hl[j])
          s[1 + 2 * j] = s[1 + 2 * j] + f
          s[2 + 2 * j] = s[2 + 2 * j] + label * f
        end
      end
      s.dirty = true
    end
    applied_pre[#applied_pre + 1] = table.concat(pre, '', first, #pre)
    if is_late then
      late = late + 1
      flags[e] = 'l'
    else
      flags[e] = 'a'
    end
  end
end

for k, s in pairs(state) do
  if s.dirty then
    local args = {}
    for i = 1, W do
      args[#args + 1] = fields[i]
      args[#args + 1] = string.format('%.17g', s[i])
    end
    args[#args + 1] = 't'
    args[#args + 1] = string.format('%.17g', s.t)
    redis.call('HSET', KEYS[k + 1], unpack(args))
  end
end

if maxoff >= nxt then
  if keep > 0 then
    local entry = struct.pack('<d', #applied_meta) .. table.concat(applied_meta)
      .. table.concat(applied_pre)
    redis.call('HSET', pitkey, string.format('%d', nxt), entry)
    local firsts = redis.call('HKEYS', pitkey)
    if #firsts > keep then
      local nums = {}
      for i, f in ipairs(firsts) do nums[i] = tonumber(f) end
      table.sort(nums)
      for i = 1, #nums - keep do redis.call('HDEL', pitkey, string.format('%d', nums[i])) end
    end
  end
  nxt = maxoff + 1
  redis.call('HSET', KEYS[1], topic, string.format('%d', nxt))
end
return {table.concat(flags), table.concat(pre), late, dup, nxt}
