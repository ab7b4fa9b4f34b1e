-- One GCRA step on Redis's clock, in one round trip: the same step as the in-process
-- `gcra::step`, horizon rule included.
--
-- KEYS[1]  the limit's key (prefix + hash tag of the user key's digest)
-- ARGV[1]  interval, ns: the time one token takes to come back
-- ARGV[2]  tolerance, ns: burst * interval
-- ARGV[3]  max wait, ns: how long the caller accepts to wait for its turn (0: admit at once)
-- ARGV[4], ARGV[5]  (tests only) seconds and microseconds to use instead of TIME
--
-- The key holds "seconds:nanoseconds:reach:window": the theoretical arrival time (TAT), how
-- far ahead of Redis's clock (ns) the admit that stored it set it (so the instant it was
-- stored is TAT - reach), and the tolerance (ns) of the quota it was stored under. A value
-- "seconds:nanoseconds" (a TAT alone) is read as such: only the clock rule below applies. No number exceeds 2^53 (Lua numbers
-- are doubles): only differences from now are computed, and the layer refuses quotas whose
-- tolerance + interval exceeds 2^52 ns. The key expires when its TAT passes: a TAT in the
-- past is the same as an absent key.
--
-- A request up to 10 us early conforms (never more than one interval less 1 ns), as the
-- in-process step allows (`CLOCK_SLACK_NS`): Redis's TIME is the system's clock, which can
-- step back.
--
-- No admit under this quota and wait bound sets a TAT further ahead than
-- tolerance + max wait + interval (the horizon). A state beyond it comes from:
--  * an older quota with a longer window (the stored window exceeds this tolerance): it is
--    capped to the instant it was stored plus this quota's window, as the in-process
--    `set_quota` caps every TAT to the change's instant plus the new window (here the change
--    is taken at the last store: a key limited under the old window is whole again within
--    the new one, whether or not it is asked about meanwhile; a key that spent more than a
--    smaller new burst stays spent);
--  * a layer with a longer wait bound on the same prefix (its reach beyond this horizon,
--    under no longer a window): its reserved turns stand, the limit is spent for this check
--    (capped to tolerance + max wait ahead, and not written);
--  * Redis's clock stepping back by more than a window since it was stored: the limit is
--    whole on the new time line (at most one burst more), as `gcra::step` takes it, instead
--    of refused for the length of the jump.
--
-- Returns {admitted (0|1), wait or retry-after (ns), TAT - now after the step (ns), the value
-- stored by an admit ("" for a rejection)}. A client that gives up a reserved turn hands that
-- value to refund.lua.
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
local horizon = tolerance + max_wait + interval
local ahead = 0
local stored = redis.call('GET', KEYS[1])
if stored then
  local s, ns, reach, window = string.match(stored, '^(%d+):(%d+):(%d+):(%d+)$')
  if not s then
    s, ns = string.match(stored, '^(%d+):(%d+)$')
  end
  if s then
    ahead = (tonumber(s) - now_s) * 1e9 + (tonumber(ns) - now_ns)
    reach = tonumber(reach)
    if reach and reach > horizon then
      if tonumber(window) > tolerance then
        -- Stored under a longer window: capped to its store instant plus this window.
        ahead = ahead - reach + tolerance
      elseif ahead > tolerance + max_wait then
        -- Turns reserved by a longer wait bound: spent for this check.
        ahead = tolerance + max_wait
      end
    end
    -- The clock went back by more than a window: whole on the new time line.
    if ahead > horizon then ahead = 0 end
    if ahead < 0 then ahead = 0 end
  end
end
local new_ahead = ahead + interval
local wait = new_ahead - tolerance
if wait <= math.min(10000, interval - 1) then wait = 0 end
if wait > max_wait then
  return {0, wait, ahead, ''}
end
if wait < 0 then wait = 0 end
local total = now_ns + new_ahead
local add_s = math.floor(total / 1e9)
local tat = string.format('%d:%d:%d:%d', now_s + add_s, total - add_s * 1e9, new_ahead,
  tolerance)
redis.call('SET', KEYS[1], tat, 'PX', math.ceil(new_ahead / 1e6))
return {1, wait, new_ahead, tat}
