-- Runs after ext_authz.
--
-- On the way in: an allowed request carries the upstream path ext_authz chose in x-gateway-path;
-- it becomes :path (an ext_authz answer over HTTP cannot set pseudo-headers) and routing starts again.
--
-- On the way back, for requests ext_authz forwarded to a customer's endpoint (routes runpod, managed):
-- 1. Token usage and the model that answered, into dynamic metadata `gateway.usage:usage` for the
--    access log:
--    from streamed (SSE) responses as the chunks pass, without buffering or delaying them; from JSON
--    responses once whole (they are buffered anyway, to catch worker errors). A pattern scan costs a
--    fraction of a full JSON parse, which matters for large embeddings responses.
-- 2. RunPod's OpenAI route can answer HTTP 200 with a worker error body: the client gets a real error
--    status in OpenAI's shape instead.
-- 3. RunPod refusing the customer's key (401/403): the client is told to reconnect RunPod, and the
--    gateway is told, so the next requests fail fast without calling RunPod.
-- 4. Any other upstream failure is answered in OpenAI's shape, pointing at the RunPod console.
--
-- Envoy's Lua has no JSON library; the patterns below only ever look at the unescaped structure of a
-- JSON document, where a model's output (always inside an escaped string) cannot imitate them.

local USAGE = "gateway.usage"
local PATH = "x-gateway-path"
local AUTHZ = "envoy.filters.http.ext_authz"
-- Bytes kept from the previous chunk, so a usage object split across two chunks is still found.
local CARRY = 512

local function error_body(message, kind, code)
  local escaped = message:gsub('[%c"\\]', function(c)
    if c == '"' then return '\\"' elseif c == "\\" then return "\\\\" else return " " end
  end)
  return string.format('{"error":{"message":"%s","type":"%s","param":null,"code":"%s"}}', escaped, kind, code)
end

-- Replaces the upstream's answer. Call it before anything that yields (httpCall): once a yield let
-- the upstream body stream on, it can no longer be replaced.
local function replace(handle, status, body)
  handle:body(true):setBytes(body)
  -- body() waited for the whole upstream body: take the headers afresh after it.
  local headers = handle:headers()
  headers:replace(":status", tostring(status))
  headers:replace("content-type", "application/json")
  headers:remove("content-encoding")
  headers:replace("content-length", tostring(#body))
end

-- The capture of `pattern` (anchored with "^") right after the last `key` in `text`. A plain find
-- jumps between occurrences; an unanchored Lua pattern would be tried at every byte of the body.
local function after_last(text, key, pattern)
  local value, from = nil, 1
  while true do
    local _, stop = text:find(key, from, true)
    if stop == nil then return value end
    value = text:match(pattern, stop + 1) or value
    from = stop + 1
  end
end

local function record_usage(handle, text)
  -- The usage object of an OpenAI stream is in the last event that carries one; a JSON response has
  -- one, at the top level.
  local usage = after_last(text, '"usage"', '^%s*:%s*(%b{})')
  if usage == nil then return end
  -- One metadata write: each one merges into the stream's metadata, which costs more than the scan.
  -- Wrapper objects do not survive a yield: fetch the metadata afresh each time.
  handle:streamInfo():dynamicMetadata():set(USAGE, "usage", {
    prompt_tokens = tonumber(usage:match('"prompt_tokens"%s*:%s*(%d+)')),
    completion_tokens = tonumber(usage:match('"completion_tokens"%s*:%s*(%d+)')),
    model = text:match('^%s*:%s*"([^"\\]*)"', (select(2, text:find('"model"', 1, true)) or #text) + 1),
  })
end

local function scan_stream(handle)
  local tail = ""
  for chunk in handle:bodyChunks() do
    local bytes = chunk:getBytes(0, chunk:length())
    local window = tail .. bytes
    if window:find('"usage"', 1, true) then record_usage(handle, window) end
    tail = window:sub(-CARRY)
  end
end

local function worker_error(body)
  -- vLLM: {"object":"error","message":...,"code":404}; the RunPod handler: {"error":{"message":...}}
  if body:find('^%s*{%s*"error"%s*:%s*{') or after_last(body, '"object"', '^%s*:%s*"(error)"') then
    local message = body:match('"message"%s*:%s*"(.-)"%s*[,}]') or "the model worker failed"
    local code = tonumber(body:match('"code"%s*:%s*(%d%d%d)'))
    if code == nil or code < 400 or code > 599 then code = 502 end
    return code, message
  end
  return nil
end

-- From ext_authz's record (a JSON object whose client-chosen strings are escaped, so they cannot
-- imitate this unescaped key/value pair).
local function workspace_of(handle)
  local authz = handle:streamInfo():dynamicMetadata():get(AUTHZ)
  local record = authz and authz["x-gw-log"] or ""
  return record:match('"workspace_id":"([%w_]+)"') or ""
end

function envoy_on_request(handle)
  local headers = handle:headers()
  local path = headers:get(PATH)
  if path == nil then return end
  headers:remove(PATH)
  headers:replace(":path", path)
  handle:clearRouteCache()
end

function envoy_on_response(handle)
  -- Only requests ext_authz allowed and forwarded reach these two routes (envoy.yaml, "runpod").
  local route = handle:streamInfo():routeName()
  if route ~= "runpod" and route ~= "managed" then return end
  local headers = handle:headers()
  local status = tonumber(headers:get(":status")) or 0
  local content_type = headers:get("content-type") or ""

  if status == 200 and content_type:find("text/event-stream", 1, true) then
    scan_stream(handle)
  elseif status == 200 then
    local body = handle:body()
    local bytes = body:getBytes(0, body:length())
    local code, message = worker_error(bytes)
    if code then
      replace(handle, code, error_body("The model worker returned an error: " .. message, "upstream_error",
        "worker_error"))
    else
      record_usage(handle, bytes)
    end
  elseif status == 401 or status == 403 then
    replace(handle, 403, error_body(
      "RunPod rejected the API key linked to this workspace. Reconnect RunPod in Settings.",
      "invalid_request_error", "byoc_runpod_key_rejected"))
    -- Synchronous on purpose: the answer leaves only once the credential is marked, so the client's
    -- next request already fails fast.
    handle:httpCall("extauth_admin", {
      [":method"] = "POST", [":path"] = "/internal/credential-rejected", [":authority"] = "extauth",
      ["content-type"] = "text/plain",
    }, workspace_of(handle), 1000)
  elseif status == 429 then
    replace(handle, 429, error_body("RunPod is rate-limiting this endpoint. Retry after the time in Retry-After.",
      "requests", "upstream_rate_limited"))
  elseif status >= 500 or status == 404 then
    replace(handle, status == 404 and 502 or status, error_body(
      "The model endpoint is unreachable or failed (HTTP " .. status .. "). "
      .. "Check the endpoint in your RunPod console.", "server_error", "upstream_unavailable"))
  end
end
