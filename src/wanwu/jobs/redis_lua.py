"""The Lua scripts of the Redis job queue (each runs atomically on the server)."""

# Re-claim (or release) only the tasks this worker still owns: XCLAIM with min-idle 0 would otherwise take a
# task back from the worker that already took it over after this one's lease lapsed.
CLAIM_OWN = """
local n = 0
for i = 4, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    if ARGV[3] == '' then
      redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    else
      redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[3], 'JUSTID')
    end
    n = n + 1
  end
end
return n
"""

# Give tasks back as if never delivered (a worker that may not read them): free at once, delivery count
# restored, so they neither wait out a lease nor move toward being given up.
DECLINE = """
for i = 4, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    local n = math.max(tonumber(p[1][4]) - 1, 0)
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[3], 'RETRYCOUNT', n, 'JUSTID')
  end
end
return 1
"""

# KEYS: job, results, stream, failed inputs · ARGV: group, message id, now, abandoned (0/1), then
# (index, ok, record json, input wire) per record: a failed record's input is kept for `jobs retry`.
COMPLETE_LUA = """
local function ack()
  redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[3], ARGV[2])
end
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HGET', KEYS[1], 'cancelled') == '1' then
  ack()
  return 0
end
local done, failed = 0, 0
for i = 5, #ARGV, 4 do
  if redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 2]) == 1 then
    if ARGV[i + 1] == '1' then
      done = done + 1
    else
      failed = failed + 1
      redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 3])
    end
  end
end
redis.call('HINCRBY', KEYS[1], 'done', done)
redis.call('HINCRBY', KEYS[1], 'failed', failed)
redis.call('HINCRBY', KEYS[1], 'abandoned', tonumber(ARGV[4]))
redis.call('HSET', KEYS[1], 'updated', ARGV[3])
ack()
return 1
"""
