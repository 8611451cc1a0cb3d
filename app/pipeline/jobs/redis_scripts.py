"""The Lua scripts of the Redis job store: each change that touches several keys, done at once.

Key layout and statuses: see ``redis_store``. Every script takes its keys in KEYS and its values
in ARGV, in the order its comment gives.
"""

from __future__ import annotations

# KEYS: active. ARGV: id, client, max jobs, max per client. -> {admitted, active, mine}
_ADMIT = """
local all = redis.call('HVALS', KEYS[1])
local mine = 0
for _, v in ipairs(all) do
  if string.sub(v, string.find(v, '|', 1, true) + 1) == ARGV[2] then mine = mine + 1 end
end
if #all >= tonumber(ARGV[3]) or mine >= tonumber(ARGV[4]) then return {0, #all, mine} end
redis.call('HSET', KEYS[1], ARGV[1], 'queued|' .. ARGV[2])
return {1, #all, mine}
"""

# KEYS: record, active. ARGV: id, consumer, ttl ms. -> {'claimed'|'gone'|'finished', attempts}
_CLAIM = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then redis.call('HDEL', KEYS[2], ARGV[1]) return {'gone', 0} end
if status ~= 'queued' and status ~= 'running' then return {'finished', 0} end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'owner', ARGV[2])
local client = redis.call('HGET', KEYS[1], 'client') or ''
redis.call('HSET', KEYS[2], ARGV[1], 'running|' .. client)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {'claimed', attempts}
"""

# KEYS: record, events, input. ARGV: consumer, view ('' = only renew), event data, ttl ms,
# events kept. -> the status, 'lost' if another consumer owns the job now, or 'gone'.
_PROGRESS = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' then return status or 'gone' end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 'lost' end
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], 'view', ARGV[2])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'name', 'progress', 'data', ARGV[3])
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('PEXPIRE', KEYS[3], ARGV[4])
return 'running'
"""

# KEYS: record, active, finished, events, input. ARGV: id, status, view, result, now (s),
# ttl ms, most finished kept, owner ('' = whoever), key prefix, events kept. -> 1 if it
# finished the job.
_FINISH = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then redis.call('HDEL', KEYS[2], ARGV[1]) return 0 end
if cur ~= 'queued' and cur ~= 'running' then return 0 end
if ARGV[8] ~= '' and redis.call('HGET', KEYS[1], 'owner') ~= ARGV[8] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'view', ARGV[3])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'result', ARGV[4]) end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[5])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[10], '*', 'name', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PEXPIRE', KEYS[4], ARGV[6])
local now = tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[6]) / 1000)
redis.call('ZADD', KEYS[3], now, ARGV[2] .. ':' .. ARGV[1])
local extra = redis.call('ZCARD', KEYS[3]) - tonumber(ARGV[7])
if extra > 0 then
  local old = redis.call('ZPOPMIN', KEYS[3], extra)
  for i = 1, #old, 2 do
    local oid = string.match(old[i], ':(.*)$')
    redis.call('DEL', ARGV[9] .. oid, ARGV[9] .. oid .. ':events')
  end
end
return 1
"""

# KEYS: record, events, finished. ARGV: id. -> 1 if a finished job was forgotten.
_FORGET = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('ZREM', KEYS[3], status .. ':' .. ARGV[1])
  return 1
end
return 0
"""

# KEYS: record, active, queue, events. ARGV: id, consumer, group, entry, view, event data,
# ttl ms, events kept. -> 1 if the job went back to the queue.
_HAND_BACK = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued', 'view', ARGV[5])
redis.call('HDEL', KEYS[1], 'owner')
redis.call('HINCRBY', KEYS[1], 'attempts', -1)
local client = redis.call('HGET', KEYS[1], 'client') or ''
redis.call('HSET', KEYS[2], ARGV[1], 'queued|' .. client)
redis.call('XACK', KEYS[3], ARGV[3], ARGV[4])
redis.call('XDEL', KEYS[3], ARGV[4])
redis.call('XADD', KEYS[3], '*', 'id', ARGV[1])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[8], '*', 'name', 'progress', 'data', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return 1
"""

# KEYS: queue. ARGV: group, idle ms, consumer ('' = any). -> consumers deleted
# A consumer with no pending entry holds nothing: deleting it loses no job (a replica's next
# XREADGROUP makes its consumer again). Replicas that died or restarted leave theirs behind.
_FORGET_CONSUMERS = """
local deleted = 0
for _, info in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local c = {}
  for i = 1, #info, 2 do c[info[i]] = info[i + 1] end
  if c['pending'] == 0 and c['idle'] >= tonumber(ARGV[2])
      and (ARGV[3] == '' or c['name'] == ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], c['name'])
    deleted = deleted + 1
  end
end
return deleted
"""


SCRIPTS = {
    "admit": _ADMIT,
    "claim": _CLAIM,
    "progress": _PROGRESS,
    "finish": _FINISH,
    "forget": _FORGET,
    "hand_back": _HAND_BACK,
    "forget_consumers": _FORGET_CONSUMERS,
}
