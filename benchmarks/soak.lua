-- soak.lua: wrk -s soak.lua URL -- MIXFILE
-- Mixed viewer-like traffic: each request picks a line of MIXFILE ("weight<TAB>path<TAB>accept") at
-- random by weight. Counts responses by status per thread; prints one "JSON {...}" line at the end.
local mix, total = {}, 0
counts = {}  -- global: done() reads it from each thread
threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("id", #threads)
end

function init(args)
  math.randomseed(os.time() * 1000 + id)
  for line in io.lines(args[1]) do
    local w, path, accept = line:match("^(%d+)\t([^\t]+)\t(.*)$")
    if w then
      total = total + tonumber(w)
      table.insert(mix, {total, path, accept})
    end
  end
end

function request()
  local r = math.random() * total
  for _, m in ipairs(mix) do
    if r <= m[1] then
      return wrk.format("GET", m[2], {["Accept"] = m[3]})
    end
  end
  return wrk.format("GET", mix[#mix][2], {["Accept"] = mix[#mix][3]})
end

function response(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
end

function done(summary, latency, requests)
  local all = {}
  for _, t in ipairs(threads) do
    for status, n in pairs(t:get("counts")) do
      all[status] = (all[status] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(all) do
    table.insert(parts, string.format('"%d":%d', status, n))
  end
  io.write(string.format('JSON {"requests":%d,"duration_us":%d,"bytes":%d,"err_connect":%d,"err_read":%d,' ..
    '"err_write":%d,"err_timeout":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,"statuses":{%s}}\n',
    summary.requests, summary.duration, summary.bytes, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout, latency:percentile(50), latency:percentile(99), latency.max,
    table.concat(parts, ",")))
end
