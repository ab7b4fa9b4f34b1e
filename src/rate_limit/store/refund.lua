-- Gives back a reserved turn that was not used (its client went away before its turn): moves
-- the theoretical arrival time (TAT) back by one interval, if the key still holds the value
-- that turn stored. If a later turn was reserved meanwhile, the turn stays spent: giving it
-- back would hand that later turn's slot out twice.
--
-- KEYS[1]  the limit's key
-- ARGV[1]  the value the turn stored ("seconds:nanoseconds:reach:window", as gcra.lua stores it)
-- ARGV[2]  interval, ns
--
-- The value written keeps the instant the turn was stored (its reach shrinks by the interval
-- as its TAT does) and its window, so gcra.lua reads it as it read the turn's.
--
-- Returns 1 if the turn was given back, 0 if not.
if redis.replicate_commands then redis.replicate_commands() end
local stored = redis.call('GET', KEYS[1])
if stored ~= ARGV[1] then
  return 0
end
local s, ns, reach, window = string.match(stored, '^(%d+):(%d+):(%d+):(%d+)$')
if not s then
  return 0
end
local interval = tonumber(ARGV[2])
local t = redis.call('TIME')
local now_s = tonumber(t[1])
local now_ns = tonumber(t[2]) * 1000
local ahead = (tonumber(s) - now_s) * 1e9 + (tonumber(ns) - now_ns) - interval
if ahead <= 0 then
  redis.call('DEL', KEYS[1])
  return 1
end
reach = tonumber(reach) - interval
if reach < 0 then reach = 0 end
local total = now_ns + ahead
local add_s = math.floor(total / 1e9)
local tat = string.format('%d:%d:%d:%s', now_s + add_s, total - add_s * 1e9, reach, window)
redis.call('SET', KEYS[1], tat, 'PX', math.ceil(ahead / 1e6))
return 1
