-- One GCRA step on Redis's clock, in one round trip.
--
-- KEYS[1]  the limit's key (prefix + hash tag of the user key's digest)
-- ARGV[1]  interval, ns: the time one token takes to come back
-- ARGV[2]  tolerance, ns: burst * interval
-- ARGV[3]  max wait, ns: how long the caller accepts to wait for its turn (0: admit at once)
-- ARGV[4], ARGV[5]  (tests only) seconds and microseconds to use instead of TIME
--
-- The key holds the theoretical arrival time (TAT) as "seconds:nanoseconds", so no number
-- exceeds 2^53 (Lua numbers are doubles): only differences from now are computed, and the
-- layer refuses quotas whose tolerance + interval exceeds 2^52 ns. The key expires when its
-- TAT passes: a TAT in the past is the same as an absent key.
--
-- A request up to 10 us early conforms (never more than one interval less 1 ns), as the
-- in-process step allows (`CLOCK_SLACK_NS`): Redis's TIME is the system's clock, which can
-- step back.
--
-- The state is capped to now + tolerance + max wait (the furthest an admit under this quota
-- can set it): a TAT further ahead counts as a spent bucket of this quota.
--
-- Returns {admitted (0|1), wait or retry-after (ns), TAT - now after the step (ns), the TAT
-- stored by an admit ("" for a rejection)}. A client that gives up a reserved turn hands
-- that TAT to refund.lua.
if redis.replicate_commands then redis.replicate_commands() end
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local now_s, now_ns
if ARGV[4] then
  now_s = tonumber(ARGV[4])
  now_ns = tonumber(ARGV[5]) * 1000
else
  local t = redis.call('TIME')
  now_s = tonumber(t[1])
  now_ns = tonumber(t[2]) * 1000
end
local ahead = 0
local stored = redis.call('GET', KEYS[1])
if stored then
  local s, ns = string.match(stored, '^(%d+):(%d+)$')
  if s then
    ahead = (tonumber(s) - now_s) * 1e9 + (tonumber(ns) - now_ns)
    if ahead < 0 then ahead = 0 end
  end
end
-- A state further ahead than this quota's window and wait allow was stored under an older,
-- longer quota (or before Redis's clock stepped back): it counts as a spent bucket of this
-- quota, so raising the quota frees a limited key within the new window.
if ahead > tolerance + max_wait then ahead = tolerance + max_wait end
local new_ahead = ahead + interval
local wait = new_ahead - tolerance
if wait <= math.min(10000, interval - 1) then wait = 0 end
if wait > max_wait then
  return {0, wait, ahead, ''}
end
if wait < 0 then wait = 0 end
local total = now_ns + new_ahead
local add_s = math.floor(total / 1e9)
local tat = string.format('%d:%d', now_s + add_s, total - add_s * 1e9)
redis.call('SET', KEYS[1], tat, 'PX', math.ceil(new_ahead / 1e6))
return {1, wait, new_ahead, tat}
