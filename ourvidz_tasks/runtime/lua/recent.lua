-- One working-memory measurement of a job shape (runs alone, without the prelude).
-- KEYS[1]: the sizes hash. ARGV: field (work:model:shape), MB, window, ttl (s) -> the recent value.
-- Keeps the shape's last `window` measurements (newest first) and its first one (first:model:shape);
-- the recent value is the largest of those kept, so it goes down once a high sample ages out.
local field, mb, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local raw = redis.call('HGET', KEYS[1], field)
local ok, kept = pcall(cjson.decode, raw or '[]')
if not ok or type(kept) ~= 'table' then kept = {} end
table.insert(kept, 1, mb)
while #kept > window do table.remove(kept) end
redis.call('HSET', KEYS[1], field, cjson.encode(kept))
redis.call('HSETNX', KEYS[1], 'first:' .. string.sub(field, 6), mb)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
local top = 0
for _, v in ipairs(kept) do if tonumber(v) > top then top = tonumber(v) end end
return top
