"""Lua scripts that make each state change one atomic step in Redis.

A transition checks the job's current state (and optionally a guard field, such as the
attempt number, so a stale worker cannot finish a newer attempt), writes the fields,
maintains the indexes, the ledger and the lease, appends the history event and wakes the
scheduler - all or nothing.
"""

SUBMIT = """
-- KEYS: next_id, pending, wake, events
-- ARGV: job fields JSON (without id), now, key prefix, [4 max waiting jobs of this user]
-- The job's own keys are named here from the new id (single-instance Redis, not Cluster).
-- Returns the new id, or -1 (nothing stored) when the user already has ARGV[4] waiting jobs.
local fields = cjson.decode(ARGV[1])
local waiting = ARGV[3] .. ':waiting:' .. fields['user']
if ARGV[4] and ARGV[4] ~= '' and redis.call('SCARD', waiting) >= tonumber(ARGV[4]) then return -1 end
local id = redis.call('INCR', KEYS[1])
local job_key = ARGV[3] .. ':job:' .. id
redis.call('SADD', waiting, id)
redis.call('HSET', job_key, 'id', id)
for k, v in pairs(fields) do redis.call('HSET', job_key, k, v) end
redis.call('ZADD', KEYS[2], id, id)
redis.call('XADD', job_key .. ':events', '*', 'state', fields['state'],
           'reason', fields['reason'] or '', 'detail', 'submitted by ' .. fields['user'], 'at', ARGV[2])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', 10000, '*', 'job', id, 'state', fields['state'], 'at', ARGV[2])
redis.call('LPUSH', KEYS[3], id)
redis.call('LTRIM', KEYS[3], 0, 99)
return id
"""

TRANSITION = """
-- KEYS: job, job_events, pending, active, finished, ledger, lease, wake, events
-- ARGV: 1 job id, 2 allowed source states (comma separated), 3 target state, 4 now,
--       5 fields JSON, 6 ledger op ('' keep | 'del' | reservation JSON),
--       7 lease op ('' keep | 'del' | ttl ms), 8 lease value, 9 wake ('1'/'0'),
--       10 guard field ('' none), 11 guard value, 12 event detail
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {0, 'missing'} end
local allowed = false
for s in string.gmatch(ARGV[2], '[^,]+') do if s == state then allowed = true end end
if not allowed then return {0, state} end
if ARGV[10] ~= '' and redis.call('HGET', KEYS[1], ARGV[10]) ~= ARGV[11] then return {0, state} end
local target = ARGV[3]
local id = ARGV[1]
redis.call('HSET', KEYS[1], 'state', target)
-- Per-user set of waiting (PENDING/HELD) job ids: what [scheduler] max_pending_per_user counts.
local waiting = string.match(KEYS[1], '^(.*):job:[^:]*$') .. ':waiting:' .. (redis.call('HGET', KEYS[1], 'user') or '')
if target == 'PENDING' or target == 'HELD' then redis.call('SADD', waiting, id)
else redis.call('SREM', waiting, id) end
local fields = cjson.decode(ARGV[5])
for k, v in pairs(fields) do
  if v == '' then redis.call('HDEL', KEYS[1], k) else redis.call('HSET', KEYS[1], k, v) end
end
if target == 'PENDING' or target == 'HELD' then
  redis.call('ZADD', KEYS[3], id, id)
  redis.call('SREM', KEYS[4], id)
elseif target == 'ASSIGNED' or target == 'RUNNING' then
  redis.call('ZREM', KEYS[3], id)
  redis.call('SADD', KEYS[4], id)
else
  redis.call('ZREM', KEYS[3], id)
  redis.call('SREM', KEYS[4], id)
  redis.call('ZADD', KEYS[5], ARGV[4], id)
end
if ARGV[6] == 'del' then redis.call('HDEL', KEYS[6], id)
elseif ARGV[6] ~= '' then redis.call('HSET', KEYS[6], id, ARGV[6]) end
if ARGV[7] == 'del' then redis.call('DEL', KEYS[7])
elseif ARGV[7] ~= '' then redis.call('SET', KEYS[7], ARGV[8], 'PX', ARGV[7]) end
local reason = redis.call('HGET', KEYS[1], 'reason') or ''
redis.call('XADD', KEYS[2], '*', 'state', target, 'from', state, 'reason', reason, 'detail', ARGV[12], 'at', ARGV[4])
redis.call('XADD', KEYS[9], 'MAXLEN', '~', 10000, '*', 'job', id, 'state', target, 'at', ARGV[4])
if ARGV[9] == '1' then
  redis.call('LPUSH', KEYS[8], id)
  redis.call('LTRIM', KEYS[8], 0, 99)
end
return {1, state}
"""

RENEW_LEASES = """
-- KEYS: lease keys; ARGV: ttl ms, node. Renews the leases this node still holds and
-- returns the 1-based positions of those it lost (expired or taken): the worker must stop
-- those jobs, since the scheduler may already have run them elsewhere.
local lost = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[2] then
    redis.call('PEXPIRE', key, ARGV[1])
  else
    table.insert(lost, i)
  end
end
return lost
"""

SUBMIT_BATCH = """
-- KEYS: pending, wake, events
-- ARGV: 1 now, 2 key prefix, 3 JSON list of job field objects (string values), each with its
--       'id' (reserved beforehand with INCRBY, so the caller knows every id). All or nothing:
--       an array's tasks appear together. 4 (optional) max waiting jobs per user: returns -1
--       and stores nothing when the tasks would take their user past it.
local jobs = cjson.decode(ARGV[3])
if #jobs > 0 and ARGV[4] and ARGV[4] ~= '' then
  local waiting = ARGV[2] .. ':waiting:' .. jobs[1]['user']
  if redis.call('SCARD', waiting) + #jobs > tonumber(ARGV[4]) then return -1 end
end
for _, fields in ipairs(jobs) do
  local id = fields['id']
  redis.call('SADD', ARGV[2] .. ':waiting:' .. fields['user'], id)
  local job_key = ARGV[2] .. ':job:' .. id
  local args = {}
  for k, v in pairs(fields) do
    table.insert(args, k)
    table.insert(args, v)
  end
  redis.call('HSET', job_key, unpack(args))
  redis.call('ZADD', KEYS[1], id, id)
  redis.call('XADD', job_key .. ':events', '*', 'state', fields['state'],
             'reason', fields['reason'] or '', 'detail', 'submitted by ' .. fields['user'], 'at', ARGV[1])
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', 10000, '*', 'job', id, 'state', fields['state'], 'at', ARGV[1])
end
redis.call('LPUSH', KEYS[2], 'submit')
redis.call('LTRIM', KEYS[2], 0, 99)
return #jobs
"""

SET_PENDING_INFO = """
-- KEYS: job, job_events; ARGV: reason, detail, expected start ('' = none), now.
-- Set a job's reason and detail only while it is still PENDING (a blind write could
-- overwrite the reason of a state it has moved on to), with a history event when they
-- change. The expected start (which moves as jobs end) is written without an event.
if redis.call('HGET', KEYS[1], 'state') ~= 'PENDING' then return 0 end
local old = redis.call('HMGET', KEYS[1], 'reason', 'detail')
redis.call('HSET', KEYS[1], 'reason', ARGV[1], 'detail', ARGV[2])
if ARGV[3] == '' then redis.call('HDEL', KEYS[1], 'est_start_at')
else redis.call('HSET', KEYS[1], 'est_start_at', ARGV[3]) end
if (old[1] or '') ~= ARGV[1] or (old[2] or '') ~= ARGV[2] then
  redis.call('XADD', KEYS[2], '*', 'state', 'PENDING', 'reason', ARGV[1], 'detail', ARGV[2], 'at', ARGV[4])
end
return 1
"""

PENDING_FIELDS = """
-- KEYS: pending (zset, score = job id)
-- ARGV: 1 key prefix, 2 read jobs with id > this, 3 at most this many, 4 n = number of
--       fields, 5..4+n field names.
-- Returns one JSON array: per job, its id then its n values (false where missing). Pages by
-- id, so jobs added or removed between pages are neither skipped nor read twice; one string
-- per page, decoded by the client's C JSON parser, instead of a command and n replies per job.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[2], '+inf', 'LIMIT', 0, tonumber(ARGV[3]))
local n = tonumber(ARGV[4])
local fields = {}
for i = 1, n do fields[i] = ARGV[4 + i] end
local out = {}
for _, id in ipairs(ids) do
  out[#out + 1] = id
  local values = redis.call('HMGET', ARGV[1] .. ':job:' .. id, unpack(fields))
  for j = 1, n do out[#out + 1] = values[j] end
end
if #out == 0 then return '[]' end
return cjson.encode(out)
"""

ACTIVE_FIELDS = """
-- KEYS: none (single-instance Redis: job and lease keys are named from the ids)
-- ARGV: 1 key prefix, 2 n = number of fields, 3..2+n field names, then job ids.
-- Returns one JSON array: per job, its n values (false where missing) then whether its
-- lease exists (1/0). The scheduler reads every active job each pass (reaper, fair share,
-- reservations): one call instead of three commands per job.
local n = tonumber(ARGV[2])
local fields = {}
for i = 1, n do fields[i] = ARGV[2 + i] end
local out = {}
for i = 3 + n, #ARGV do
  local values = redis.call('HMGET', ARGV[1] .. ':job:' .. ARGV[i], unpack(fields))
  for j = 1, n do out[#out + 1] = values[j] end
  out[#out + 1] = redis.call('EXISTS', ARGV[1] .. ':lease:' .. ARGV[i])
end
if #out == 0 then return '[]' end
return cjson.encode(out)
"""
