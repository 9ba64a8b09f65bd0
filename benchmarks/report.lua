-- report.lua: wrk -s report.lua ...  (also the script behind the Orthanc figures in docs/archive-behaviour.md)
-- Prints one machine-readable line at the end of a run; benchmarks/run.py parses the "JSON " line.
done = function(summary, latency, requests)
  io.write(string.format('JSON {"requests":%d,"duration_us":%d,"bytes":%d,"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.0f,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
