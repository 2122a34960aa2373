-- HGETALL of every key, in one call (one server: a batch's item attributes and codes).
-- KEYS[1..]  hashes; returns one flat {field, value, ...} list per key ({} if absent).
-- Keys may lie in several Cluster slots, so a cluster client sends HGETALLs instead.
local out = {}
for i = 1, #KEYS do out[i] = redis.call('HGETALL', KEYS[i]) end
return out
