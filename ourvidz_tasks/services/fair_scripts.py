"""The Lua scripts of the fair order (:mod:`.fairness`): each step one atomic script on the broker.

Start-time fair queueing (Goyal et al., 1996) over users, costs in estimated GPU-seconds:

- a job of user ``u`` taken in gets the start tag ``S = max(v, F[u])``, and ``F[u] = S + cost / weight``
  (``v``: the virtual clock, the start tag of the job picked last);
- pools pick the smallest start tag (ties in arrival order: members are ``{seq}:{delivery tag}``);
- a job taken in again (a recovery requeue, a retry, a deferred copy) keeps its start tag: its place.

So a backlogged user's jobs take consecutive slices of virtual time and each active user's share of
GPU-seconds follows its weight; a user arriving behind a flood starts after at most one job of each
other active user. Keys: :func:`~ourvidz_tasks.contract.keys.fair` (per queue) and
:func:`~ourvidz_tasks.contract.keys.fair_job` (per job; built in the scripts from the prefix below).
"""

from __future__ import annotations

from ..contract import keys

#: the parts of one queue's fair order, in the order the scripts take them as KEYS
PARTS = ("waiting", "messages", "meta", "users", "counts", "state", "running", "pools", "bell")

_PRELUDE = f"""
local JOB = '{keys.fair_job('')}'
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

#: KEYS: the queue's parts (:data:`PARTS`). ARGV: queue, job TTL, ``once``, then per message 7 fields:
#: the intake's processing list, the message, its delivery tag, job id (or ''), user, cost, weight.
#: Each message still in its processing list moves into the fair order; returns how many did. A
#: message already waiting under its tag is taken in once; with ``once`` ('1': tags name messages for
#: good, the RabbitMQ relay's task id and retry count), one taken in before is too, waiting or not.
ADMIT = _PRELUDE + """
local waiting, messages, meta, users, counts, state, running, bell =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[9]
local queue, ttl, once = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1'
local v = tonumber(redis.call('HGET', state, 'v') or '0')

-- the start tag and member of a message: its job's own when it comes back, else the next of its user;
-- nil when this very message was taken in already (a broker delivered it twice: once is enough)
local function place(tag, job, user, cost, weight)
  if job ~= '' then
    local old = redis.call('HMGET', JOB .. job, 'queue', 'start', 'member')
    if old[1] == queue and old[2] and old[3] then
      local same = tag ~= '-' and string.sub(old[3], -#tag - 1) == ':' .. tag
      local waits = redis.call('ZSCORE', waiting, old[3])
      if same and (waits or once) then return nil end
      if not waits then return tonumber(old[2]), old[3] end
    end
  end
  local start = math.max(v, tonumber(redis.call('ZSCORE', users, user) or '0'))
  redis.call('ZADD', users, start + cost / weight, user)
  return start, string.format('%012x', redis.call('HINCRBY', state, 'seq', 1)) .. ':' .. tag
end

local added = 0
for i = 4, #ARGV, 7 do
  local processing, item, tag, job, user = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local cost, weight = tonumber(ARGV[i + 5]), tonumber(ARGV[i + 6])
  local start, member
  if redis.call('LREM', processing, 1, item) == 1 then start, member = place(tag, job, user, cost, weight) end
  if start then
    redis.call('ZADD', waiting, start, member)
    redis.call('HSET', messages, member, item)
    redis.call('HSET', meta, member, cjson.encode({j = job, c = cost, u = user}))
    redis.call('HINCRBY', counts, user, 1)
    redis.call('HINCRBYFLOAT', state, 'cost', cost)
    if job ~= '' then
      redis.call('HSET', JOB .. job, 'queue', queue, 'start', start, 'member', member, 'cost', cost,
                 'user', user, 'weight', weight)
      redis.call('HSETNX', JOB .. job, 'arrived', now)
      redis.call('EXPIRE', JOB .. job, ttl)
      redis.call('ZREM', running, job)
    end
    added = added + 1
  end
end
for _ = 1, math.min(added, 64) do redis.call('RPUSH', bell, 1) end
if added > 0 then redis.call('LTRIM', bell, -64, -1) end
return added
"""

#: KEYS: per queue, its parts (:data:`PARTS`) then the consumer's processing list for it. ARGV: the
#: consumer, seconds a pool counts as present, seconds a running entry is kept, then the queue names.
#: (The job counts as running from its start, :data:`STARTED`.)
#: The first queue with a waiting message gives its smallest start tag to the processing list;
#: returns ``{queue, message}`` or nil.
PICK = _PRELUDE + """
local width = #KEYS / (#ARGV - 3)
for q = 0, #ARGV - 4 do
  local k = q * width
  local waiting, messages, meta, users, counts, state, running, pools, processing =
    KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5], KEYS[k + 6], KEYS[k + 7], KEYS[k + 8],
    KEYS[k + 10]
  redis.call('ZADD', pools, now, ARGV[1])
  local head = redis.call('ZPOPMIN', waiting)
  if head[1] then
    local member, start = head[1], tonumber(head[2])
    local item = redis.call('HGET', messages, member)
    local info = cjson.decode(redis.call('HGET', meta, member) or '{}')
    redis.call('HDEL', messages, member)
    redis.call('HDEL', meta, member)
    local user = info.u or ''
    if redis.call('HINCRBY', counts, user, -1) <= 0 then redis.call('HDEL', counts, user) end
    if redis.call('ZCARD', waiting) == 0 then
      redis.call('HSET', state, 'cost', 0)
    else
      redis.call('HINCRBYFLOAT', state, 'cost', -(info.c or 0))
    end
    local v = math.max(start, tonumber(redis.call('HGET', state, 'v') or '0'))
    redis.call('HSET', state, 'v', v)
    redis.call('ZREMRANGEBYSCORE', users, '-inf', '(' .. v)
    redis.call('ZREMRANGEBYSCORE', pools, '-inf', now - tonumber(ARGV[2]))
    redis.call('ZREMRANGEBYSCORE', running, '-inf', now - tonumber(ARGV[3]))
    if item then
      redis.call('LPUSH', processing, item)
      return {ARGV[4 + q], item}
    end
  end
end
return false
"""

#: KEYS: the job's queue's ``running``, the job's hash. ARGV: job id. The job starts (an attempt of it):
#: it runs from now; returns the broker's clock and the job's arrival (nil: none recorded).
STARTED = _PRELUDE + """
redis.call('ZADD', KEYS[1], now, ARGV[1])
return {tostring(now), redis.call('HGET', KEYS[2], 'arrived')}
"""

#: KEYS: the job's queue's ``users`` and ``running``, the job's hash. ARGV: job id, GPU-seconds it
#: took. The job ended: its user's finish tag corrected by what it really cost, its entries gone.
FINISH = """
local users, running, job = KEYS[1], KEYS[2], KEYS[3]
redis.call('ZREM', running, ARGV[1])
local j = redis.call('HMGET', job, 'user', 'cost', 'weight')
if j[1] then
  local last = redis.call('ZSCORE', users, j[1])
  if last then
    local delta = (tonumber(ARGV[2]) - tonumber(j[2])) / tonumber(j[3])
    redis.call('ZADD', users, tonumber(last) + delta, j[1])
  end
end
redis.call('DEL', job)
return 1
"""

#: KEYS: the job's hash, its terminal record, then the family lists publishers send to. ARGV: job id,
#: seconds a pool counts as present, then each family list's family. Where the job stands, as JSON:
#: ``state`` and, while queued, ``family``, ``position``, ``ahead``, ``eta_s``, ``waited_s`` (CONTRACT
#: section 7). O(log n) in the queue's length once the job is taken in (a rank, a count, one read per
#: running job); a job published but not yet taken in (its pool is starting, or its intake is between
#: its move and its admission) is looked for in the intakes' lists and among the oldest :data:`LISTED`
#: messages of each family list, by the job id its ``argsrepr`` header shows.
LISTED = 1000
STANDING = _PRELUDE + f"local LISTED = {LISTED}\n" + """
local function secs(x) return math.floor(math.max(0, x) * 1000 + 0.5) / 1000 end
-- queued with `ahead` jobs before it in the fair order whose keys start with `p`: it starts when the
-- running jobs' rest and its share of the waiting jobs' estimated cost are done, over the pools present
local function queued(family, p, ahead, waited)
  local busy = 0
  local running = redis.call('ZRANGE', p .. 'running', 0, -1, 'WITHSCORES')
  for i = 1, #running, 2 do
    local cost = tonumber(redis.call('HGET', JOB .. running[i], 'cost') or '0')
    busy = busy + math.max(0, cost - (now - tonumber(running[i + 1])))
  end
  local n = redis.call('ZCARD', p .. 'waiting')
  local total = math.max(0, tonumber(redis.call('HGET', p .. 'state', 'cost') or '0'))
  local pools = math.max(1, redis.call('ZCOUNT', p .. 'pools', now - tonumber(ARGV[2]), '+inf'))
  local mean = 0
  if n > 0 then mean = total / n end
  return cjson.encode({state = 'queued', family = family, position = ahead, ahead = ahead,
                       eta_s = secs((busy + mean * ahead) / pools), waited_s = waited})
end
local prefix = '""" + keys.FAIR_PREFIX + """'
if redis.call('EXISTS', KEYS[2]) == 1 then return cjson.encode({state = 'ended'}) end
local j = redis.call('HMGET', KEYS[1], 'queue', 'member', 'arrived')
if j[1] then
  local p = prefix .. j[1] .. ':'
  local family = (string.gsub(j[1], '%.fair$', ''))
  local waited = secs(now - tonumber(j[3] or now))
  local rank = redis.call('ZRANK', p .. 'waiting', j[2])
  if rank then return queued(family, p, rank, waited) end
  if redis.call('ZSCORE', p .. 'running', ARGV[1]) then
    return cjson.encode({state = 'running', family = family, waited_s = waited})
  end
  return cjson.encode({state = 'queued', family = family, waited_s = waited, position = 0, ahead = 0, eta_s = 0})
end
-- not taken in yet: behind every job in its family's fair order. Being taken in (an intake's list,
-- between its move and its admission: a batch at most)...
local mark = "('" .. ARGV[1] .. "',)"
local fetchers = redis.call('HGETALL', '""" + keys.FETCHERS + """')
for i = 1, #fetchers, 2 do
  if string.find(fetchers[i], '""" + keys.INTAKE_SUFFIX + """:', 1, true) then
    for _, item in ipairs(redis.call('LRANGE', fetchers[i], 0, LISTED - 1)) do
      if string.find(item, mark, 1, true) then
        local fair = string.match(cjson.decode(fetchers[i + 1]).queue or '', '^[^\6]+') or ''
        local p = prefix .. fair .. ':'
        return queued((string.gsub(fair, '%.fair$', '')), p, redis.call('ZCARD', p .. 'waiting'), 0)
      end
    end
  end
end
-- ...or on a family list (workers pop the right end, so the oldest messages are the last ones)
for i = 3, #KEYS do
  local items = redis.call('LRANGE', KEYS[i], -LISTED, -1)
  for k = #items, 1, -1 do
    if string.find(items[k], mark, 1, true) then
      local p = prefix .. ARGV[i] .. ':'
      return queued(ARGV[i], p, redis.call('ZCARD', p .. 'waiting') + #items - k, 0)
    end
  end
end
return cjson.encode({state = 'unknown'})
"""

#: KEYS: n source lists, then their n processing lists, then the queues' ``pools``. ARGV: the most to
#: move, the consumer. Moves up to that many messages, sources in order (kombu's priority order), each
#: into its processing list; returns ``{source, message, ...}``. The consumer is marked present.
GRAB = _PRELUDE + """
local n = (#KEYS - 1) / 2
redis.call('ZADD', KEYS[#KEYS], now, ARGV[2])
local out = {}
for i = 1, n do
  while #out < 2 * tonumber(ARGV[1]) do
    local item = redis.call('LMOVE', KEYS[i], KEYS[n + i], 'RIGHT', 'LEFT')
    if not item then break end
    out[#out + 1] = KEYS[i]
    out[#out + 1] = item
  end
end
return out
"""

#: KEYS: a queue's lists (kombu's priority steps), then its fair order's ``waiting``. The jobs waiting
#: on the queue: not taken in yet, and in its fair order.
DEPTH = """
local n = redis.call('ZCARD', KEYS[#KEYS])
for i = 1, #KEYS - 1 do n = n + redis.call('LLEN', KEYS[i]) end
return n
"""
