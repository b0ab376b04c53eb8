-- The memory ledger's common prelude: every operation is this file followed by its own
-- (lua/<operation>.lua), run atomically by Redis. It reclaims expired leases and tickets first,
-- so a killed pool's memory comes back on the next call of any pool.
--
-- KEYS: the ledger's state keys, `{prefix}:{name}` (ourvidz_tasks.runtime.scripts.STATE);
-- K[name] is each one, by the name after its last colon.
-- ARGV[1..5]: budget (MB), preferred pool, queue depths (JSON), patience (ms), key TTL (s);
-- each operation's own arguments follow from ARGV[6].
local K = {}
for _, key in ipairs(KEYS) do K[string.match(key, '([^:]*)$')] = key end
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
