"""The memory ledger's Redis scripts (Lua), kept apart from :mod:`ourvidz_tasks.runtime.ledger`.

Each operation is ``PRELUDE + OPS[name]``, run atomically by Redis; the
prelude reclaims expired leases and tickets first, so a killed pool's
memory comes back on the next call of any pool.
"""

STATE = ("held", "token", "lease", "pools", "tickets", "tlease", "tinfo", "seq",
          "requests", "wants", "wantmb", "stats", "switches", "meta")

# KEYS: the _STATE keys in order. ARGV[1..5]: budget, preferred, depths (JSON),
# patience (ms), ttl (s); each operation's own arguments follow from ARGV[6].
PRELUDE = """
local K = {}
local names = {'held','token','lease','pools','tickets','tlease','tinfo','seq',
               'requests','wants','wantmb','stats','switches','meta'}
for i, n in ipairs(names) do K[n] = KEYS[i] end
local budget = tonumber(ARGV[1])
local preferred = ARGV[2]
local depths = cjson.decode(ARGV[3])
local patience = tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function pool_of(m) return string.match(m, '^([^/]*)/') end
local function model_of(m) return string.match(m, '/(.*)$') end

local function touch()
  redis.call('HSET', K.meta, 'budget', budget, 'seen', now)
  for i = 1, #KEYS do
    if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('EXPIRE', KEYS[i], ttl) end
  end
end

local function used()
  local total = 0
  for _, v in ipairs(redis.call('HVALS', K.held)) do total = total + tonumber(v) end
  return total
end

local function drop_ticket(tk)
  redis.call('ZREM', K.tickets, tk)
  redis.call('ZREM', K.tlease, tk)
  redis.call('HDEL', K.tinfo, tk)
end

local function needs()
  local n = {}
  for p, d in pairs(depths) do n[p] = tonumber(d) end
  for _, tk in ipairs(redis.call('ZRANGE', K.tickets, 0, -1)) do
    local info = cjson.decode(redis.call('HGET', K.tinfo, tk))
    n[info.pool] = (n[info.pool] or 0) + 1
  end
  for _, m in ipairs(redis.call('ZRANGE', K.wants, 0, -1)) do
    local p = pool_of(m)
    n[p] = (n[p] or 0) + 1
  end
  return n
end

local function reclaim()
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', K.lease, '-inf', now)) do
    redis.call('HDEL', K.held, m)
    redis.call('HDEL', K.token, m)
    redis.call('ZREM', K.lease, m)
    redis.call('HINCRBY', K.stats, 'reclaimed', 1)
  end
  for _, tk in ipairs(redis.call('ZRANGEBYSCORE', K.tlease, '-inf', now)) do
    drop_ticket(tk)
    redis.call('HINCRBY', K.stats, 'abandoned', 1)
  end
  redis.call('ZREMRANGEBYSCORE', K.wants, '-inf', now)
  for _, m in ipairs(redis.call('HKEYS', K.wantmb)) do
    if not redis.call('ZSCORE', K.wants, m) then redis.call('HDEL', K.wantmb, m) end
  end
  local req, need = redis.call('HGETALL', K.requests), nil
  for i = 1, #req, 2 do
    local r = cjson.decode(req[i + 1])
    local held = redis.call('HEXISTS', K.held, r.pool .. '/' .. r.model) == 1
    local alive = not (r.expires and r.expires <= now)
    if r.ticket and not redis.call('ZSCORE', K.tickets, r.ticket) then alive = false end
    if r.want and not redis.call('ZSCORE', K.wants, r.want) then alive = false end
    if r.action == 'unload' and not held then alive = false end
    if r.action == 'load' and held then alive = false end
    if r.action == 'unload' and r.reason == 'predict' and alive then
      need = need or needs()
      if (need[r.pool] or 0) > 0 then alive = false end  -- predictions never evict needed models
    end
    if not alive then redis.call('HDEL', K.requests, req[i]) end
  end
  redis.call('ZREMRANGEBYSCORE', K.switches, '-inf', now - 3600000)
end

-- ask idle holders of other pools to unload until `shortfall` MB is covered
local function make_room(pool, model, shortfall, cause, cause_id, allow_needed)
  local covered, asked = 0, {}
  local req = redis.call('HGETALL', K.requests)
  for i = 1, #req, 2 do
    local r = cjson.decode(req[i + 1])
    if r.action == 'unload' then
      covered = covered + (r.mb or 0)
      asked[r.pool .. '/' .. r.model] = true
    end
  end
  if covered >= shortfall then return end
  local need = needs()
  local cands = {}
  local held = redis.call('HGETALL', K.held)
  for i = 1, #held, 2 do
    local m = held[i]
    local p = pool_of(m)
    local state = redis.call('HGET', K.pools, p)
    local nd = need[p] or 0
    if p ~= pool and state ~= 'busy' and not asked[m] and (nd == 0 or allow_needed) then
      table.insert(cands, {m = m, p = p, mb = tonumber(held[i + 1]), need = nd,
                           pref = (p == preferred) and 1 or 0, since = tonumber(state) or 0})
    end
  end
  table.sort(cands, function(a, b)
    if a.need ~= b.need then return a.need < b.need end
    if a.pref ~= b.pref then return a.pref < b.pref end
    if a.since ~= b.since then return a.since < b.since end
    return a.m < b.m
  end)
  for _, c in ipairs(cands) do
    if covered >= shortfall then break end
    local r = {action = 'unload', pool = c.p, model = model_of(c.m), mb = c.mb, reason = cause,
               for_pool = pool, for_model = model, at = now}
    if cause == 'evict' then r.ticket = cause_id else r.want = cause_id end
    redis.call('HSET', K.requests, 'unload|' .. c.m, cjson.encode(r))
    covered = covered + c.mb
  end
end

local function plan()
  local head = redis.call('ZRANGE', K.tickets, 0, 0)[1]
  if head then
    local info = cjson.decode(redis.call('HGET', K.tinfo, head))
    local m = info.pool .. '/' .. info.model
    local short = used() + info.mb - (tonumber(redis.call('HGET', K.held, m)) or 0) - budget
    if short > 0 then
      make_room(info.pool, info.model, short, 'evict', head, now - info.at >= patience)
    end
    return
  end
  local extra = 0
  for _, m in ipairs(redis.call('ZRANGE', K.wants, 0, -1)) do
    if redis.call('HEXISTS', K.held, m) == 0 then
      extra = extra + tonumber(redis.call('HGET', K.wantmb, m) or 0)
      local short = used() + extra - budget
      if short > 0 then make_room(pool_of(m), model_of(m), short, 'predict', m, false) end
    end
  end
end

reclaim()
"""

OPS = {
    # pool, model, mb, ticket, token, lease_ms, enqueue -> {status, ticket, free, position}
    "reserve": """
local pool, model, mb, ticket, token = ARGV[6], ARGV[7], tonumber(ARGV[8]), ARGV[9], ARGV[10]
local lease_ms, enqueue = tonumber(ARGV[11]), ARGV[12] == '1'
local m = pool .. '/' .. model
if ticket ~= '' and not redis.call('ZSCORE', K.tickets, ticket) then ticket = '' end
local holder = redis.call('HGET', K.token, m)
local cur = 0
if holder == token then cur = tonumber(redis.call('HGET', K.held, m)) or 0 end
local head = redis.call('ZRANGE', K.tickets, 0, 0)[1]
local first = (not head) or head == ticket
local shrink = holder == token and mb <= cur
if shrink or (first and (not holder or holder == token) and used() + mb - cur <= budget) then
  redis.call('HSET', K.held, m, mb)
  redis.call('HSET', K.token, m, token)
  redis.call('ZADD', K.lease, now + lease_ms, m)
  if cur == 0 then redis.call('HINCRBY', K.stats, 'grants', 1) end
  if ticket ~= '' then drop_ticket(ticket) end
  plan()
  touch()
  return {'granted', ticket, budget - used(), 0}
end
if not enqueue then
  touch()
  return {'busy', '', budget - used(), redis.call('ZCARD', K.tickets)}
end
if ticket == '' then
  ticket = tostring(redis.call('INCR', K.seq))
  redis.call('ZADD', K.tickets, tonumber(ticket), ticket)
  redis.call('HSET', K.tinfo, ticket, cjson.encode({pool = pool, model = model, mb = mb, at = now}))
  redis.call('HINCRBY', K.stats, 'waits', 1)
end
redis.call('ZADD', K.tlease, now + lease_ms, ticket)
plan()
touch()
return {'wait', ticket, budget - used(), redis.call('ZRANK', K.tickets, ticket)}
""",
    # ticket, timed_out -> 1
    "cancel": """
drop_ticket(ARGV[6])
if ARGV[7] == '1' then redis.call('HINCRBY', K.stats, 'timeouts', 1) end
reclaim()
plan()
touch()
return 1
""",
    # member, token, lease_ms, mb -> 1 refreshed, 2 reinstated, 0 held by another
    "refresh": """
local m, token, lease_ms, mb = ARGV[6], ARGV[7], tonumber(ARGV[8]), tonumber(ARGV[9])
local holder = redis.call('HGET', K.token, m)
local code = 1
if holder and holder ~= token then touch() return 0 end
if not holder then
  redis.call('HSET', K.held, m, mb)
  redis.call('HSET', K.token, m, token)
  redis.call('HINCRBY', K.stats, 'reinstated', 1)
  code = 2
end
redis.call('ZADD', K.lease, now + lease_ms, m)
touch()
return code
""",
    # member, token -> MB released
    "release": """
local m, token = ARGV[6], ARGV[7]
if redis.call('HGET', K.token, m) ~= token then touch() return 0 end
local mb = tonumber(redis.call('HGET', K.held, m)) or 0
redis.call('HDEL', K.held, m)
redis.call('HDEL', K.token, m)
redis.call('ZREM', K.lease, m)
redis.call('HINCRBY', K.stats, 'releases', 1)
local r = redis.call('HGET', K.requests, 'unload|' .. m)
if r then
  local reason = cjson.decode(r).reason
  if reason == 'evict' or reason == 'predict' then
    redis.call('HINCRBY', K.stats, 'switches', 1)
    redis.call('ZADD', K.switches, now, now .. ':' .. m .. ':' .. redis.call('INCR', K.seq))
  else
    redis.call('HINCRBY', K.stats, 'forced', 1)
  end
  redis.call('HDEL', K.requests, 'unload|' .. m)
end
plan()
touch()
return mb
""",
    # pool, state ('busy' | 'idle')
    "set_busy": """
local pool = ARGV[6]
if ARGV[7] == 'busy' then
  redis.call('HSET', K.pools, pool, 'busy')
elseif redis.call('HGET', K.pools, pool) == 'busy' or not redis.call('HGET', K.pools, pool) then
  redis.call('HSET', K.pools, pool, now)
end
plan()
touch()
return 1
""",
    # pool, model, mb, ttl_ms
    "want": """
local m = ARGV[6] .. '/' .. ARGV[7]
redis.call('ZADD', K.wants, now + tonumber(ARGV[9]), m)
redis.call('HSET', K.wantmb, m, tonumber(ARGV[8]))
plan()
touch()
return 1
""",
    # action, pool, model, mb, reason, ttl_ms -> 1 recorded, 0 pointless
    "request": """
local action, pool, model = ARGV[6], ARGV[7], ARGV[8]
local held = redis.call('HEXISTS', K.held, pool .. '/' .. model) == 1
if (action == 'unload') ~= held then touch() return 0 end
redis.call('HSET', K.requests, action .. '|' .. pool .. '/' .. model, cjson.encode({
  action = action, pool = pool, model = model, mb = tonumber(ARGV[9]), reason = ARGV[10],
  at = now, expires = now + tonumber(ARGV[11])}))
touch()
return 1
""",
    # field
    "done": """
redis.call('HDEL', K.requests, ARGV[6])
touch()
return 1
""",
    # -> JSON snapshot of the whole ledger
    "snapshot": """
plan()
touch()
local function map(key)
  local out, raw = {}, redis.call('HGETALL', key)
  for i = 1, #raw, 2 do out[raw[i]] = raw[i + 1] end
  return out
end
local tickets = {}
for _, tk in ipairs(redis.call('ZRANGE', K.tickets, 0, -1)) do
  table.insert(tickets, cjson.decode(redis.call('HGET', K.tinfo, tk)))
end
return cjson.encode({now = now, held = map(K.held), pools = map(K.pools), tickets = tickets,
  wants = map(K.wantmb), requests = map(K.requests), stats = map(K.stats),
  switches = redis.call('ZCARD', K.switches)})
""",
}

# KEYS[1]: the sizes hash. ARGV: field (work:model:shape), MB, window, ttl -> the recent value.
# Keeps the shape's last `window` measurements (newest first) and its first one (first:model:shape);
# the recent value is the largest of those kept, so it goes down once a high sample ages out.
RECENT_SCRIPT = """
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
"""
