"""Lua scripts that make each state change one atomic step in Redis.

Every key a script touches arrives in KEYS[] (built by `jobs.keys`, passed by `JobStore` and
the readers); no script builds a key name. A transition checks the job's current state, an
optional guard field (the attempt number, so a late worker cannot finish a newer attempt)
and an optional fencing token (so a stale worker cannot write at all), then writes the
fields, maintains the indexes, the per-user waiting count, the ledger, the lease and the RQ
launch entry, appends the history event and wakes the scheduler - all or nothing.
"""

SUBMIT = """
-- KEYS: 1 pending, 2 wake, 3 events, 4 waiting counts (hash user -> n), 5 waiting bytes
--       (hash user -> bytes of their waiting jobs' specs), then per job its hash key and its
--       events key (2 keys a job, in the order of the JSON list).
-- ARGV: 1 now, 2 JSON list of job field objects (string values, each with its 'id', reserved
--       beforehand with INCRBY), 3 max waiting jobs of this user ('' = no limit), 4 max bytes
--       of specs of this user's waiting jobs ('' = no limit).
-- All or nothing: an array's tasks appear together. Returns -1 (nothing stored) when the
-- jobs would take their user past ARGV[3] waiting jobs, -2 past ARGV[4] bytes, -3 when the
-- first id is another job's, else the number stored.
-- Idempotent: the ids are reserved for this submit alone, so a first job that exists with
-- this submit's time is a resend of a call Redis already ran (its answer lost to a timeout,
-- a dropped connection): nothing is stored or counted again, and the answer is the first
-- one's. One with another time is another job (the id counter went back): -3, nothing stored.
local jobs = cjson.decode(ARGV[2])
if #jobs == 0 then return 0 end
if redis.call('EXISTS', KEYS[6]) == 1 then
  if redis.call('HGET', KEYS[6], 'submitted_at') == jobs[1]['submitted_at'] then return #jobs end
  return -3
end
local user = jobs[1]['user']
local waiting = tonumber(redis.call('HGET', KEYS[4], user) or '0')
if ARGV[3] ~= '' and waiting + #jobs > tonumber(ARGV[3]) then return -1 end
local added = 0
for _, fields in ipairs(jobs) do added = added + string.len(fields['spec']) end
local stored = tonumber(redis.call('HGET', KEYS[5], user) or '0')
if ARGV[4] ~= '' and stored + added > tonumber(ARGV[4]) then return -2 end
for i, fields in ipairs(jobs) do
  local id = fields['id']
  local job_key, events_key = KEYS[4 + 2 * i], KEYS[5 + 2 * i]
  local args = {}
  for k, v in pairs(fields) do
    table.insert(args, k)
    table.insert(args, v)
  end
  redis.call('HSET', job_key, unpack(args))
  redis.call('ZADD', KEYS[1], id, id)
  redis.call('XADD', events_key, '*', 'state', fields['state'],
             'reason', fields['reason'] or '', 'detail', 'submitted by ' .. user, 'at', ARGV[1])
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', 10000, '*', 'job', id, 'state', fields['state'], 'at', ARGV[1])
end
redis.call('HINCRBY', KEYS[4], user, #jobs)
redis.call('HINCRBY', KEYS[5], user, added)
redis.call('LPUSH', KEYS[2], 'submit')
redis.call('LTRIM', KEYS[2], 0, 99)
return #jobs
"""

# One transition as a Lua function of its keys K and args A, shared by TRANSITION (one) and
# TRANSITION_MANY (a batch in one script call): one body, so both write exactly the same.
_TRANSITION_FUNCTION = """
-- KEYS: 1 job, 2 job_events, 3 pending, 4 active, 5 finished, 6 ledger, 7 lease, 8 wake,
--       9 events, 10 waiting counts, 11 fence key, 12 RQ queue, 13 RQ job, 14 waiting bytes,
--       15 notification events
-- ARGV: 1 job id, 2 allowed source states (comma separated), 3 target state, 4 now,
--       5 fields JSON ('' value = delete the field), 6 ledger op ('' keep | 'del' | reservation
--       JSON), 7 lease op ('' keep | 'del' | ttl ms), 8 lease value, 9 wake ('1'/'0'),
--       10 guard field ('' none), 11 guard value, 12 event detail, 13 fence token ('' none),
--       14 RQ launch id to remove ('' none)
-- Returns {1, previous state} or {0, current state | 'missing' | 'fenced'}.
local function transition(K, A)
  local state = redis.call('HGET', K[1], 'state')
  if not state then return {0, 'missing'} end
  if A[13] ~= '' and redis.call('GET', K[11]) ~= A[13] then return {0, 'fenced'} end
  local allowed = false
  for s in string.gmatch(A[2], '[^,]+') do if s == state then allowed = true end end
  if not allowed then return {0, state} end
  if A[10] ~= '' and redis.call('HGET', K[1], A[10]) ~= A[11] then return {0, state} end
  local target = A[3]
  local id = A[1]
  redis.call('HSET', K[1], 'state', target)
  -- The per-user count of waiting (PENDING/HELD) jobs and the bytes of their specs: what
  -- [scheduler] max_pending_per_user and max_stored_per_user cap. A job's spec is counted as
  -- it is when it starts waiting (after this transition's writes: an OOM retry rewrites it) and
  -- when it stops (before them); it does not change while it waits.
  local was_waiting = state == 'PENDING' or state == 'HELD'
  local is_waiting = target == 'PENDING' or target == 'HELD'
  local user = redis.call('HGET', K[1], 'user') or ''
  if was_waiting ~= is_waiting then
    local n = redis.call('HINCRBY', K[10], user, is_waiting and 1 or -1)
    if n <= 0 then redis.call('HDEL', K[10], user) end
  end
  if was_waiting and not is_waiting then
    local b = redis.call('HINCRBY', K[14], user, -redis.call('HSTRLEN', K[1], 'spec'))
    if b <= 0 then redis.call('HDEL', K[14], user) end
  end
  local fields = cjson.decode(A[5])
  for k, v in pairs(fields) do
    if v == '' then redis.call('HDEL', K[1], k) else redis.call('HSET', K[1], k, v) end
  end
  if is_waiting and not was_waiting then
    redis.call('HINCRBY', K[14], user, redis.call('HSTRLEN', K[1], 'spec'))
  end
  if is_waiting then
    redis.call('ZADD', K[3], id, id)
    redis.call('SREM', K[4], id)
  elseif target == 'ASSIGNED' or target == 'RUNNING' then
    redis.call('ZREM', K[3], id)
    redis.call('SADD', K[4], id)
  else
    redis.call('ZREM', K[3], id)
    redis.call('SREM', K[4], id)
    redis.call('ZADD', K[5], A[4], id)
  end
  if A[6] == 'del' then redis.call('HDEL', K[6], id)
  elseif A[6] ~= '' then redis.call('HSET', K[6], id, A[6]) end
  if A[7] == 'del' then redis.call('DEL', K[7])
  elseif A[7] ~= '' then redis.call('SET', K[7], A[8], 'PX', A[7]) end
  if A[14] ~= '' then
    redis.call('LREM', K[12], 0, A[14])
    redis.call('DEL', K[13])
  end
  local reason = redis.call('HGET', K[1], 'reason') or ''
  redis.call('XADD', K[2], '*', 'state', target, 'from', state, 'reason', reason, 'detail', A[12], 'at', A[4])
  redis.call('XADD', K[9], 'MAXLEN', '~', 10000, '*', 'job', id, 'state', target, 'from', state, 'reason', reason,
             'at', A[4])
  -- A notification event when the job asked for this one (its 'notify' field: the events,
  -- comma separated), in the same step as the change: no change without its event, no event
  -- without its change (jobs.notify.STATE_EVENTS is the same table).
  local wants = redis.call('HGET', K[1], 'notify')
  if wants then
    local event = ({COMPLETED = 'end', FAILED = 'fail', HELD = 'held', RUNNING = 'started-late'})[target]
    if event and string.find(',' .. wants .. ',', ',' .. event .. ',', 1, true) then
      redis.call('XADD', K[15], 'MAXLEN', '~', 1000000, '*', 'job', id, 'event', event, 'at', A[4])
    end
  end
  if A[9] == '1' then
    redis.call('LPUSH', K[8], id)
    redis.call('LTRIM', K[8], 0, 99)
  end
  return {1, state}
end
"""

TRANSITION = _TRANSITION_FUNCTION + "return transition(KEYS, ARGV)\n"

# A batch of transitions in one script call (dispatch queues a whole pass's assignments
# inside its MULTI as one command instead of one EVALSHA each: per-command packing,
# parsing and script start-up were most of a dispatch's cost). Each is applied on its own,
# in order, exactly as TRANSITION would; a refused one does not stop the others.
TRANSITION_MANY = (
    _TRANSITION_FUNCTION
    + """
-- KEYS: TRANSITION's nine keys shared by every job (3-6, 8-10, 14, 15) once, then its six
-- per-job keys (1, 2, 7, 11, 12, 13) for each transition; ARGV: 14 args per transition.
-- Returns one TRANSITION reply per transition, in order.
local shared = {[3] = KEYS[1], [4] = KEYS[2], [5] = KEYS[3], [6] = KEYS[4], [8] = KEYS[5],
                [9] = KEYS[6], [10] = KEYS[7], [14] = KEYS[8], [15] = KEYS[9]}
local own = {1, 2, 7, 11, 12, 13}
local out = {}
for i = 0, (#KEYS - 9) / 6 - 1 do
  local K, A = {}, {}
  for j, key in pairs(shared) do K[j] = key end
  for j = 1, 6 do K[own[j]] = KEYS[9 + i * 6 + j] end
  for j = 1, 14 do A[j] = ARGV[i * 14 + j] end
  out[#out + 1] = transition(K, A)
end
return out
"""
)

RENEW_GPU_CLAIMS = """
-- KEYS: the worker's GPU claims (keys.gpu_owner). ARGV: 1 its claim value, 2 ttl ms.
-- Renews each claim the worker holds and takes back one that lapsed (nobody holds it); one
-- that another worker holds is left alone (this one was frozen past its TTL meanwhile).
-- Returns the 1-based positions of the claims another worker holds.
local lost = {}
for i = 1, #KEYS do
  local holder = redis.call('GET', KEYS[i])
  if not holder or holder == ARGV[1] then
    redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
  else
    table.insert(lost, i)
  end
end
return lost
"""

RENEW_LEASES = """
-- KEYS: 1 the worker's fence key, then the lease keys. ARGV: 1 ttl ms, 2 lease value (node),
--       3 the worker's fencing token.
-- Returns -1 when the token is stale (another worker took this node: renew nothing), else
-- the 1-based positions (among the lease keys) of the leases this node no longer holds
-- (expired or taken): the worker must stop those jobs, the scheduler may have run them elsewhere.
if redis.call('GET', KEYS[1]) ~= ARGV[3] then return -1 end
local lost = {}
for i = 2, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[2] then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
  else
    table.insert(lost, i - 1)
  end
end
return lost
"""

SET_PENDING_INFOS = """
-- KEYS: 1 the leader's fence key, then for each job: its hash, its history stream.
-- ARGV: 1 the scheduler's fence ('' = none), 2 now, then for each job: reason, detail,
--       expected start ('' = none).
-- Why each job waits: its reason and detail are set only while it is still PENDING (a blind
-- write could overwrite the reason of a state it has moved on to), with a history event when
-- they change; the expected start (which moves as jobs end) is written without an event.
-- One call for a pass's batch (arguments packed once, not a command per job).
-- Returns -1 (nothing written) when a newer leader holds the fence, else how many were written.
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local written = 0
for i = 0, (#KEYS - 1) / 2 - 1 do
  local job, events = KEYS[2 + 2 * i], KEYS[3 + 2 * i]
  local reason, detail, est = ARGV[3 + 3 * i], ARGV[4 + 3 * i], ARGV[5 + 3 * i]
  if redis.call('HGET', job, 'state') == 'PENDING' then
    local old = redis.call('HMGET', job, 'reason', 'detail')
    redis.call('HSET', job, 'reason', reason, 'detail', detail)
    if est == '' then redis.call('HDEL', job, 'est_start_at')
    else redis.call('HSET', job, 'est_start_at', est) end
    if (old[1] or '') ~= reason or (old[2] or '') ~= detail then
      redis.call('XADD', events, '*', 'state', 'PENDING', 'reason', reason, 'detail', detail, 'at', ARGV[2])
    end
    written = written + 1
  end
end
return written
"""

REQUEST_CANCEL = """
-- KEYS: job, job_events, the node's control list, the global events stream.
-- ARGV: attempt, event detail, now, this job's id.
-- Ask a running attempt's worker to stop it for a cancel: only while that attempt is still
-- RUNNING. Written blind, the mark landed on a job requeued meanwhile (node lost, preempted):
-- it waited again, its user told CANCELLING, and ran again in full. The global stream names
-- the job (no state: not a transition): the scheduler keeps the mark with the active jobs,
-- and its reaper cancels, not requeues, a marked job whose node died.
-- Returns 1 if asked, 0 if the attempt no longer runs (the caller looks at the job again).
local h = redis.call('HMGET', KEYS[1], 'state', 'attempt')
if h[1] ~= 'RUNNING' or h[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'cancel_requested', '1')
redis.call('XADD', KEYS[2], '*', 'state', 'RUNNING', 'reason', '', 'detail', ARGV[2], 'at', ARGV[3])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', 10000, '*', 'job', ARGV[4], 'at', ARGV[3])
redis.call('RPUSH', KEYS[3], 'cancel ' .. ARGV[4] .. ' ' .. ARGV[1])
return 1
"""

REQUEST_PREEMPT = """
-- KEYS: job, job_events, the node's control list, the leader's fence key.
-- ARGV: attempt, job preempted for, event detail, now, the scheduler's fence ('' = none),
--       this job's id (for the control message).
-- Ask a running attempt's worker to preempt it: only while that attempt is still RUNNING
-- (a job that ended or moved meanwhile is left alone) and while `fence` is current.
-- Returns 1 if asked, 0 if the job moved on, -1 when a newer leader holds the fence.
if ARGV[5] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[5] then return -1 end
local h = redis.call('HMGET', KEYS[1], 'state', 'attempt')
if h[1] ~= 'RUNNING' or h[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'preempt_requested', ARGV[2])
redis.call('XADD', KEYS[2], '*', 'state', 'RUNNING', 'reason', 'Preempted', 'detail', ARGV[3], 'at', ARGV[4])
redis.call('RPUSH', KEYS[3], 'preempt ' .. ARGV[6] .. ' ' .. ARGV[1] .. ' ' .. ARGV[2])
return 1
"""

JOB_FIELDS = """
-- KEYS: m job hashes, then (when ARGV[2] is '1') their m lease keys.
-- ARGV: 1 n = number of fields, 2 '1' to add whether each lease exists, 3..2+n field names.
-- Returns one JSON array: per job, its n values (false where missing), then 1/0 for its
-- lease if asked. The scheduler reads the pending and active jobs' changing fields every
-- pass: one string per page, decoded by the client's C JSON parser, instead of a command
-- and n replies per job.
local n = tonumber(ARGV[1])
local with_lease = ARGV[2] == '1'
local m = with_lease and #KEYS / 2 or #KEYS
local fields = {}
for i = 1, n do fields[i] = ARGV[2 + i] end
local out = {}
for i = 1, m do
  local values = redis.call('HMGET', KEYS[i], unpack(fields))
  for j = 1, n do out[#out + 1] = values[j] end
  if with_lease then out[#out + 1] = redis.call('EXISTS', KEYS[m + i]) end
end
if #out == 0 then return '[]' end
return cjson.encode(out)
"""

JOB_HASHES = """
-- KEYS: job hashes. Returns each whole (HGETALL's flat field/value list; empty if missing),
-- in order: one command for a page of records, where a pipeline packed one per record.
local out = {}
for i = 1, #KEYS do out[i] = redis.call('HGETALL', KEYS[i]) end
return out
"""

LAPSED_LEASES = """
-- KEYS: lease keys. Returns the (1-based) positions of those that no longer exist: the
-- scheduler's lease check, every housekeeping interval, over every active job.
local out = {}
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then out[#out + 1] = i end
end
return out
"""

OBSERVE = """
-- KEYS: 1 job, 2 the worker's fence key. ARGV: 1 fencing token, 2 attempt, 3 fields JSON.
-- What a worker measured about one running attempt (memory, the job's checked status):
-- written only while that attempt is RUNNING and the worker's token is current, so a late
-- heartbeat never decorates a finished or re-dispatched job. Returns 1 if written, 0 if not,
-- -1 when the token is stale.
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
local h = redis.call('HMGET', KEYS[1], 'state', 'attempt')
if h[1] ~= 'RUNNING' or h[2] ~= ARGV[2] then return 0 end
for k, v in pairs(cjson.decode(ARGV[3])) do redis.call('HSET', KEYS[1], k, v) end
return 1
"""

NOTIFY_INTAKE = """
-- KEYS: 1 outbox, 2 due, 3 queued counts, 4 the user's stats, 5 notification events stream
-- ARGV: 1 consumer group, 2 stream entry id, 3 user, 4 max queued per user (0 = no cap), 5 now,
--       then pairs: delivery id, delivery JSON.
-- One event's deliveries join the outbox and the event is acknowledged, in one step: a
-- notifier that dies before it leaves the event pending (read again, at-least-once); a
-- redelivered event whose deliveries are already in the outbox is only acknowledged.
-- Past the user's cap the deliveries are dropped and counted. Returns the number queued.
local queued = 0
local n = (#ARGV - 5) / 2
if n > 0 and redis.call('HEXISTS', KEYS[1], ARGV[6]) == 0 then
  local have = tonumber(redis.call('HGET', KEYS[3], ARGV[3]) or '0')
  if ARGV[4] ~= '0' and have + n > tonumber(ARGV[4]) then
    redis.call('HINCRBY', KEYS[4], 'dropped', n)
  else
    for i = 0, n - 1 do
      redis.call('HSET', KEYS[1], ARGV[6 + 2 * i], ARGV[7 + 2 * i])
      redis.call('ZADD', KEYS[2], ARGV[5], ARGV[6 + 2 * i])
    end
    redis.call('HINCRBY', KEYS[3], ARGV[3], n)
    queued = n
  end
end
redis.call('XACK', KEYS[5], ARGV[1], ARGV[2])
return queued
"""

NOTIFY_CLAIM = """
-- KEYS: 1 due, 2 outbox. ARGV: 1 now, 2 claimed until, 3 at most this many.
-- Take the deliveries that are due and push them to ARGV[2] (a lease): if this notifier dies
-- while sending, they are due again then, for any notifier. Returns {id, JSON, id, JSON, ...}.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  local item = redis.call('HGET', KEYS[2], id)
  if item then
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    table.insert(out, id)
    table.insert(out, item)
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
"""

NOTIFY_SETTLE = """
-- KEYS: 1 outbox, 2 due, 3 queued counts, 4 the user's stats. ARGV: 1 user, 2 outcome
-- ('sent' | 'failed' | 'retry'), 3 now, 4 retry at, 5 last error ('' keep), then delivery
-- ids, or for 'retry' pairs: id, updated JSON.
-- The end of one attempt for deliveries of one user: gone from the outbox (sent, or given
-- up) or due again later. A delivery another notifier already settled is left alone, so the
-- per-user count stays exact when two notifiers raced.
local settled = 0
if ARGV[2] == 'retry' then
  for i = 6, #ARGV, 2 do
    if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
      redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
      redis.call('ZADD', KEYS[2], ARGV[4], ARGV[i])
      settled = settled + 1
    end
  end
else
  for i = 6, #ARGV do
    if redis.call('HDEL', KEYS[1], ARGV[i]) == 1 then
      redis.call('ZREM', KEYS[2], ARGV[i])
      settled = settled + 1
    end
  end
  if settled > 0 then
    local left = redis.call('HINCRBY', KEYS[3], ARGV[1], -settled)
    if left <= 0 then redis.call('HDEL', KEYS[3], ARGV[1]) end
    redis.call('HINCRBY', KEYS[4], ARGV[2], settled)
  end
end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[4], 'last_error', ARGV[5], 'last_error_at', ARGV[3]) end
return settled
"""

LOG_APPEND = """
-- KEYS: 1 the job's log stream, 2 its meta hash
-- ARGV: 1 attempt, 2 bytes skipped before this data (not kept: the shipper's rate cap),
--       3 data, 4 cap on bytes kept, 5 head bytes (never trimmed; in at most ARGV[5] / 32
--       entries), 6 retention ms,
--       7 (optional) where the skipped bytes begin in this attempt's output, as the shipper counts
-- An older attempt than the newest seen is refused (a stale worker's late flush): -1.
-- With ARGV[7], an append is idempotent: the meta's `apos` says how far this attempt's output
-- is stored, and what lies before it is not stored again (a resend of an append whose answer
-- was lost: a timeout while Redis was stalled, a dropped connection).
-- Appends at offset `end` (the entry id's first part is the byte offset), then trims the
-- oldest entries after the head until at most ARGV[4] bytes are kept (data and the entries'
-- own cost). Returns the new end.
local attempt = tonumber(ARGV[1])
local seen = tonumber(redis.call('HGET', KEYS[2], 'attempt') or '0')
if attempt < seen then return -1 end
local apos = 0
if attempt > seen then
  redis.call('HSET', KEYS[2], 'attempt', attempt)
  redis.call('HDEL', KEYS[2], 'apos')
else
  apos = tonumber(redis.call('HGET', KEYS[2], 'apos') or '0')
end
local skip = tonumber(ARGV[2])
local data = ARGV[3]
if ARGV[7] then
  local at = tonumber(ARGV[7])
  local first = at + skip  -- where this data begins in the attempt's output
  local after = first + string.len(data)
  if after <= apos and at < apos then return tonumber(redis.call('HGET', KEYS[2], 'end') or '0') end
  if apos > first then
    data = string.sub(data, apos - first + 1)
    skip = 0
  else
    skip = first - apos  -- what the shipper skipped, and what an earlier append lost (never stored)
  end
  redis.call('HSET', KEYS[2], 'apos', string.format('%d', after))
end
local pos = tonumber(redis.call('HGET', KEYS[2], 'end') or '0') + skip
local n = string.len(data)
local stored = tonumber(redis.call('HGET', KEYS[2], 'stored') or '0')
local dropped = tonumber(redis.call('HGET', KEYS[2], 'dropped') or '0') + skip
local cap, head = tonumber(ARGV[4]), tonumber(ARGV[5])
-- Each entry costs Redis about this much besides its data (measured: 26 bytes with
-- stream-node-max-bytes 512): a job shipping a byte a tick must not keep a million entries.
local overhead = 32
-- The head (never trimmed) ends at offset `hend`: ARGV[5], or sooner, once it holds
-- ARGV[5] / overhead entries (`hcount`): a byte a tick from the start must not make
-- thousands of untrimmable entries, while a head shipped in ordinary lines stays whole.
local hend = tonumber(redis.call('HGET', KEYS[2], 'hend') or ARGV[5])
local newest = nil
if n > 0 then
  if pos < hend then
    local hcount = tonumber(redis.call('HGET', KEYS[2], 'hcount') or '0') + 1
    if hcount > math.max(1, math.floor(head / overhead)) then
      hend = pos  -- this entry and every later one are trimmable
      redis.call('HSET', KEYS[2], 'hend', string.format('%d', hend))
    else
      redis.call('HSET', KEYS[2], 'hcount', string.format('%d', hcount))
    end
  end
  newest = string.format('%d-1', pos)
  redis.call('XADD', KEYS[1], newest, 'd', data)
  stored = stored + n
  pos = pos + n
end
local entries = redis.call('XLEN', KEYS[1])
while stored + overhead * entries > cap do
  local oldest = redis.call('XRANGE', KEYS[1], string.format('%d-0', hend), '+', 'COUNT', 1)
  if #oldest == 0 or oldest[1][1] == newest then break end
  local len = string.len(oldest[1][2][2])
  redis.call('XDEL', KEYS[1], oldest[1][1])
  stored = stored - len
  dropped = dropped + len
  entries = entries - 1
end
redis.call('HSET', KEYS[2], 'end', string.format('%d', pos), 'stored', string.format('%d', stored),
           'dropped', string.format('%d', dropped))
redis.call('PEXPIRE', KEYS[2], ARGV[6])
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[6]) end
return pos
"""

LOG_READ = """
-- KEYS: 1 the job's log stream, 2 its meta hash
-- ARGV: 1 offset, 2 most bytes to return
-- Returns {end, start, data...}: `end` the offset after the last byte seen (0: no log),
-- `start` the offset of the first byte returned (> ARGV[1] when bytes there were not kept),
-- then contiguous pieces (the first may begin inside an entry: the caller cuts it).
local e = tonumber(redis.call('HGET', KEYS[2], 'end') or '0')
local offset = tonumber(ARGV[1])
local budget = tonumber(ARGV[2])
local out = {e, -1}
if offset >= e then return out end
local entries = redis.call('XREVRANGE', KEYS[1], string.format('%d-1', offset), '-', 'COUNT', 1)
local nextpos = nil
local from = string.format('%d-0', offset)
if #entries == 1 then
  local start = tonumber(string.match(entries[1][1], '^(%d+)'))
  local data = entries[1][2][2]
  if start + string.len(data) > offset then
    local piece = string.sub(data, offset - start + 1, offset - start + budget)
    out[2] = offset
    table.insert(out, piece)
    budget = budget - string.len(piece)
    nextpos = offset + string.len(piece)
  end
  from = '(' .. entries[1][1]
end
while budget > 0 do
  local batch = redis.call('XRANGE', KEYS[1], from, '+', 'COUNT', 16)
  if #batch == 0 then break end
  for _, entry in ipairs(batch) do
    local start = tonumber(string.match(entry[1], '^(%d+)'))
    if nextpos ~= nil and start ~= nextpos then return out end
    if budget <= 0 then return out end
    local piece = string.sub(entry[2][2], 1, budget)
    if out[2] == -1 then out[2] = start end
    table.insert(out, piece)
    budget = budget - string.len(piece)
    nextpos = start + string.len(piece)
    from = '(' .. entry[1]
  end
end
return out
"""

INVARIANT_SNAPSHOT = """
-- KEYS: 1 ledger, 2 active, 3 pending. ARGV: 1 the lease keys' pattern.
-- One atomic snapshot for jobs.invariants: the ledger's jobs, the active and the waiting
-- ones, and every lease key, found with SCAN in the same script (not KEYS: it is in the ACL
-- category @dangerous, which README "Security"'s minimal ACL takes away). Names may repeat.
local leases = {}
local cursor = '0'
repeat
  local reply = redis.call('SCAN', cursor, 'MATCH', ARGV[1], 'COUNT', 1000)
  cursor = reply[1]
  for _, key in ipairs(reply[2]) do leases[#leases + 1] = key end
until cursor == '0'
return {redis.call('HKEYS', KEYS[1]), redis.call('SMEMBERS', KEYS[2]), redis.call('ZRANGE', KEYS[3], 0, -1), leases}
"""

# ---- leader election (scheduler/leader.py; docs/ARCHITECTURE.md "Leader and fencing") -------
# Lease times are Redis's (PX TTLs, TIME), never a scheduler's clock: a clock jump on a host
# cannot extend or cut a lease. The fence "<epoch>:<token>" changes only when a new leadership
# begins; the epoch alone could repeat after a failover that lost its INCR, the token cannot.

LEADER_ACQUIRE = """
-- KEYS: 1 lease, 2 epoch counter, 3 fence, 4 leader info, 5 schedulers (presence zset)
-- ARGV: 1 random token, 2 holder (host:pid socket), 3 lease ttl ms
-- Records this scheduler as alive; takes the lease if no one holds it. Returns the new fence
-- "<epoch>:<token>", or '' when another scheduler holds the lease. A lease already holding
-- this token is returned as it is (a retried call whose first reply was lost).
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[5], now_ms, ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now_ms - 86400000)
local current = redis.call('GET', KEYS[1])
if current then
  if string.match(current, ':(.*)$') == ARGV[1] then return current end
  return ''
end
local epoch = redis.call('INCR', KEYS[2])
local fence = epoch .. ':' .. ARGV[1]
redis.call('SET', KEYS[3], fence)
redis.call('SET', KEYS[1], fence, 'PX', ARGV[3])
redis.call('HSET', KEYS[4], 'holder', ARGV[2], 'epoch', epoch, 'since_ms', now_ms, 'lease_ms', ARGV[3])
return fence
"""

LEADER_RENEW = """
-- KEYS: 1 lease, 2 schedulers (presence zset). ARGV: 1 fence, 2 holder, 3 lease ttl ms
-- Extends the lease if it is still this leadership's. Returns 1, or 0 when it lapsed or
-- another scheduler holds it (this one must stop scheduling).
local t = redis.call('TIME')
redis.call('ZADD', KEYS[2], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), ARGV[2])
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

LEADER_RELEASE = """
-- KEYS: 1 lease, 2 schedulers (presence zset). ARGV: 1 fence, 2 holder
-- A scheduler that stops: no longer alive, and the lease freed at once if it is still its own.
redis.call('ZREM', KEYS[2], ARGV[2])
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end
return 0
"""

PROFILE_ADD = """
-- KEYS: 1 profile list, 2 the user's profile index (zset), 3 the worker's fence key.
-- ARGV: 1 fencing token, 2 sample JSON, 3 job id, 4 attempt, 5 window, 6 now, 7 max
--       profiles per user, 8 digest, 9 ttl seconds.
-- One finished attempt's measured peak, once (a replayed end adds nothing), only from the
-- worker that holds the node now. Returns 1 if added, 0 if already there, -1 when fenced.
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return -1 end
local window = tonumber(ARGV[5])
for _, raw in ipairs(redis.call('LRANGE', KEYS[1], 0, window - 1)) do
  local ok, s = pcall(cjson.decode, raw)
  if ok and type(s) == 'table' and tostring(s['job_id']) == ARGV[3] and tostring(s['attempt']) == ARGV[4] then
    return 0
  end
end
redis.call('LPUSH', KEYS[1], ARGV[2])
redis.call('LTRIM', KEYS[1], 0, window - 1)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[9]))
redis.call('ZADD', KEYS[2], tonumber(ARGV[6]), ARGV[8])
-- Oldest profiles leave the index past the cap; their lists expire on their own.
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[7])
if over > 0 then redis.call('ZREMRANGEBYRANK', KEYS[2], 0, over - 1) end
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[9]))
return 1
"""

RUNNING_EVENT = """
-- KEYS: 1 job, 2 job_events, 3 the worker's fence key. ARGV: 1 fencing token, 2 attempt,
-- 3 detail, 4 now, 5 fields JSON.
-- An event in a running attempt's history (a memory warning), with fields, only while that
-- attempt is RUNNING and the worker's token is current. Returns 1, 0 (not running) or -1.
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return -1 end
local h = redis.call('HMGET', KEYS[1], 'state', 'attempt')
if h[1] ~= 'RUNNING' or h[2] ~= ARGV[2] then return 0 end
for k, v in pairs(cjson.decode(ARGV[5])) do redis.call('HSET', KEYS[1], k, v) end
redis.call('XADD', KEYS[2], '*', 'state', 'RUNNING', 'reason', '', 'detail', ARGV[3], 'at', ARGV[4])
return 1
"""


# Add counts folded from the global events stream to the metric counters (scheduler/counters.py),
# and move the fold's cursor - unless another folder moved it first (then nothing is added).
# KEYS: 1 counters hash. ARGV: 1 expected cursor ('' = none yet), 2 new cursor,
# 3 JSON {field: increment}.
FOLD_COUNTERS = """
local current = redis.call('HGET', KEYS[1], '_cursor') or ''
if current ~= ARGV[1] then return 0 end
for field, n in pairs(cjson.decode(ARGV[3])) do
  redis.call('HINCRBYFLOAT', KEYS[1], field, tostring(n))
end
redis.call('HSET', KEYS[1], '_cursor', ARGV[2])
return 1
"""

DAEMON_CHECKIN = """
-- KEYS: 1 live daemons (zset id -> expiry, Redis ms), 2 their records (hash id -> JSON)
-- ARGV: 1 this daemon's id, 2 its gpulab version, 3 its record (JSON), 4 ttl ms,
--       5 '1' = refuse if a live daemon runs another version (at start), '0' = just renew
-- Forgets daemons whose expiry passed (by Redis's clock: one clock for every host), then
-- checks and (re)registers this one. Returns {1, now ms} or {0, other id, its version}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, id in ipairs(gone) do redis.call('HDEL', KEYS[2], id) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[5] == '1' then
  for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    if id ~= ARGV[1] then
      local raw = redis.call('HGET', KEYS[2], id)
      local ok, info = pcall(cjson.decode, raw or '')
      local version = (ok and type(info) == 'table' and info['version']) or '?'
      if version ~= ARGV[2] then return {0, id, tostring(version)} end
    end
  end
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return {1, string.format('%d', now)}
"""
