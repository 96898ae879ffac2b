-- Runs after ext_authz.
--
-- On the way in: an allowed request carries the upstream path ext_authz chose in x-gateway-path;
-- it becomes :path (an ext_authz answer over HTTP cannot set pseudo-headers) and routing starts again.
--
-- On the way back, for requests ext_authz forwarded to an endpoint (routes runpod, managed):
-- 1. Token usage and the model that answered, into dynamic metadata `gateway.usage:usage` for the
--    access log, with `source`: "final" (the upstream's own final figures), "partial" (the upstream's
--    cumulative figures as of the last chunk that passed: the stream was cut before its end) or
--    "counted" (no usage seen: `completion_tokens` is the number of content events that reached the
--    client; the meter estimates the rest, meter/parse.py).
-- 2. Streams (SSE) are rewritten event by event as they pass, never delayed past their event's end:
--    forced usage (ENABLE_FORCE_INCLUDE_USAGE puts cumulative usage in every chunk and adds a final
--    `choices: []` chunk) is kept for the meter but shown to the client as OpenAI would: no usage and
--    no `choices: []` chunk unless the request asked (`stream_options.include_usage`, lifted by
--    json_to_metadata), and then only that one final usage chunk. Since a client may leave at any
--    moment, the latest figures are written to the metadata as each chunk passes.
-- 3. RunPod's OpenAI route answers worker errors as HTTP 200 (worker-vllm: vLLM's status and detail
--    inside the message; infinity: an "error" object): the client gets that status and vLLM's detail
--    in OpenAI's shape. Small JSON bodies are buffered to catch them; large ones (embeddings batches)
--    stream through, their usage read from their first and last bytes.
-- 4. RunPod refusing the customer's key (401/403): the client is told to reconnect RunPod, and the
--    gateway is told, so the next requests fail fast. Refusing the platform's key (managed): a 503 to the
--    client, an error line in Envoy's log for operators, no customer credential touched.
-- 5. Any other upstream failure is answered in OpenAI's shape, pointing at the RunPod console.
--
-- 6. A modality's own unit, into `gateway.usage:units` ({unit, quantity, detail}) for the access log:
--    images (the request's `n`, its `size` as detail) and speech synthesis (the characters of the
--    request's `input`) on the way in; audio seconds of a transcription or translation from the
--    answer's `usage` (`{"type": "duration", "seconds": N}`) when it has one, else as
--    envoy/authz_request.lua measured the file. Audio answers (speech) pass through untouched.
--
-- Envoy's Lua has no JSON library; the patterns below only ever look at the unescaped structure of a
-- JSON document, where a model's output (always inside an escaped string) cannot imitate them.

local USAGE = "gateway.usage"
local REQUEST = "envoy.filters.http.json_to_metadata"
local PATH = "x-gateway-path"
local AUTHZ = "envoy.filters.http.ext_authz"
-- JSON bodies up to this size are buffered whole (worker errors are a few hundred bytes); larger ones
-- stream through. Bodies without a content-length are buffered too (under the buffer limit).
local BUFFER_MAX = 1048576
-- Bytes read from each end of a large JSON body: the model comes first, the usage object last.
local EDGE = 1024
-- A partial SSE event is held back until its end arrives, up to this size; past it, it passes as is.
local HOLD_MAX = 65536

local function escape(text)
  return (text:gsub('[%c"\\]', function(c)
    if c == '"' then return '\\"' elseif c == "\\" then return "\\\\" else return " " end
  end))
end

-- `message` must already be JSON-escaped string content.
local function error_json(message, kind, code)
  return string.format('{"error":{"message":"%s","type":"%s","param":null,"code":"%s"}}', message, kind, code)
end

local function error_body(message, kind, code)
  return error_json(escape(message), kind, code)
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

-- The escaped content of the JSON string value of the first `key` in `text` (nil if none).
local function string_field(text, key)
  local _, stop = text:find(key, 1, true)
  if stop == nil then return nil end
  local _, open = text:find('^%s*:%s*"', stop + 1)
  if open == nil then return nil end
  local from = open + 1
  local pos = from
  while true do
    local quote = text:find('"', pos, true)
    if quote == nil then return nil end
    local back = quote - 1
    while back >= from and text:byte(back) == 92 do back = back - 1 end
    if (quote - 1 - back) % 2 == 0 then return text:sub(from, quote - 1) end
    pos = quote + 1
  end
end

-- A usage object's prompt and completion tokens.
local function token_figures(usage)
  local prompt = usage:match('"prompt_tokens"%s*:%s*(%d+)')
  if prompt then
    return tonumber(prompt), tonumber(usage:match('"completion_tokens"%s*:%s*(%d+)'))
  end
  -- the Responses API's names (and an image or speech answer's token usage)
  return tonumber(usage:match('"input_tokens"%s*:%s*(%d+)')), tonumber(usage:match('"output_tokens"%s*:%s*(%d+)'))
end

local function usage_entry(usage, model, source)
  local prompt, completion = token_figures(usage)
  return { prompt_tokens = prompt, completion_tokens = completion, model = model, source = source }
end

local function first_model(text)
  return text:match('^%s*:%s*"([^"\\]*)"', (select(2, text:find('"model"', 1, true)) or #text) + 1)
end

local function record_usage(handle, text)
  -- A JSON response has one usage object, at the top level, after its data.
  local usage = after_last(text, '"usage"', '^%s*:%s*(%b{})')
  if usage == nil then return end
  -- One metadata write: each one merges into the stream's metadata, which costs more than the scan.
  -- Wrapper objects do not survive a yield: fetch the metadata afresh each time.
  local entry = usage_entry(usage, first_model(text), "final")
  local metadata = handle:streamInfo():dynamicMetadata()
  metadata:set(USAGE, "usage", entry)
  if entry.prompt_tokens == nil then
    -- A transcription's or translation's usage: the audio's duration as the upstream measured it.
    local seconds = tonumber(usage:match('"seconds"%s*:%s*(%d+%.?%d*)'))
    if seconds then metadata:set(USAGE, "units", { unit = "audio_second", quantity = seconds, detail = "upstream" }) end
  end
end

-- The index of the quote that closes the JSON string opened at `open`, or nil.
local function string_end(text, open)
  local quote = open
  while true do
    quote = text:find('"', quote + 1, true)
    if quote == nil then return nil end
    local back = quote - 1
    while back > open and text:byte(back) == 92 do back = back - 1 end
    if (quote - 1 - back) % 2 == 0 then return quote end
  end
end

-- The escaped content of the string member `key` of the top-level object in `text` (nil if none):
-- a member of the same name inside a nested object or a string never counts, and of two members of
-- that name the last one does, as the upstream's JSON parser (Python's) reads it.
local function top_level_string(text, key)
  local depth, pos, found = 0, 1, nil
  while true do
    local at = text:find('[{}%[%]"]', pos)
    if at == nil then return found end
    local c = text:byte(at)
    if c == 34 then
      local close = string_end(text, at)
      if close == nil then return found end
      pos = close + 1
      -- A member's name, not a value that happens to read the same (`"voice": "input"`).
      if depth == 1 and text:find("^%s*:", pos) and text:sub(at + 1, close - 1) == key then
        local _, open = text:find('^%s*:%s*"', pos)
        found = nil -- a later non-string value replaces an earlier string too
        if open then
          local value_end = string_end(text, open)
          if value_end == nil then return nil end
          found, pos = text:sub(open + 1, value_end - 1), value_end + 1
        end
      end
    else
      depth = depth + ((c == 123 or c == 91) and 1 or -1)
      pos = at + 1
    end
  end
end

-- Characters (Unicode code points, as the upstream counts them) of escaped JSON string content.
local function characters(escaped)
  local plain = escaped:gsub("\\(.)(%x?%x?%x?%x?)", function(c, hex)
    if c == "u" and #hex == 4 then
      local unit = tonumber(hex, 16)
      if unit >= 0xD800 and unit <= 0xDBFF then return "" end -- the pair's low half counts it
      return "x"
    end
    return "x" .. hex
  end)
  return #plain - select(2, plain:gsub("[\128-\191]", ""))
end

local function set_units(handle, unit, quantity, detail)
  handle:streamInfo():dynamicMetadata():set(USAGE, "units", { unit = unit, quantity = quantity, detail = detail })
end

local function speech_units(handle)
  local body = handle:body()
  local input = body and top_level_string(body:getBytes(0, body:length()), "input")
  if input then set_units(handle, "character", characters(input), "input") end
end

local function image_units(handle)
  local request = handle:streamInfo():dynamicMetadata():get(REQUEST) or {}
  local n, size = request["n"], request["size"]
  if n ~= nil and (type(n) ~= "number" or n < 1 or n ~= math.floor(n)) then return end -- refused upstream
  set_units(handle, "image", n or 1, type(size) == "string" and size or "default")
end

-- Whatever a worker's message holds, the client never sees an address inside RunPod or a key.
local function scrub(message)
  message = message:gsub("https?://[^%s\"\\]*", "(internal address)")
  message = message:gsub("%d+%.%d+%.%d+%.%d+:%d+", "(internal address)")
  message = message:gsub("%d+%.%d+%.%d+%.%d+", "(internal address)")
  message = message:gsub("localhost:%d+", "(internal address)")
  return (message:gsub("rpa_[%w_%-]+", "(redacted)"))
end

-- A worker error in a 200 body: its status and OpenAI-shaped body, or nil for a real answer.
local function worker_error(body)
  -- worker-vllm: {"error":{"message":"vLLM returned HTTP 400: <vLLM's JSON>","type":"worker_error",...}}
  -- infinity: {"object":"error","message":...,"code":400}
  local wrapped = body:find('^%s*{%s*"error"%s*:%s*{')
  if not wrapped and not after_last(body, '"object"', '^%s*:%s*"(error)"') then return nil end
  local message = string_field(body, '"message"') or "The model worker failed."
  local status
  local vllm_status, detail = message:match("^vLLM returned HTTP (%d%d%d): (.*)$")
  if vllm_status then
    status = tonumber(vllm_status)
    -- vLLM's own error body, escaped once more inside the worker's message: its message is the detail.
    message = string_field((detail:gsub('\\([\\"/])', "%1")), '"message"') or detail
  elseif not wrapped then
    status = tonumber(body:match('"code"%s*:%s*(%d%d%d)'))
  end
  if status == nil or status < 400 or status > 599 then status = 502 end
  local code = "worker_error"
  if status == 404 then code = "model_not_found"
  elseif message:find("maximum context length", 1, true) then code = "context_length_exceeded" end
  local kind = status < 500 and "invalid_request_error" or "server_error"
  return status, error_json(scrub(message), kind, code)
end

local function set_usage(handle, entry)
  handle:streamInfo():dynamicMetadata():set(USAGE, "usage", entry)
end

-- A streamed request's worker error arrives as one JSON object, not SSE, once the 200 headers have
-- gone: the client gets it as an SSE error event (the OpenAI SDK raises APIError with its message).
local function stream_error(handle, chunk, pending)
  local object = pending:match("^%s*(%b{})")
  if object == nil then
    chunk:setBytes("")
    return pending
  end
  local _, body = worker_error(object)
  chunk:setBytes("event: error\ndata: " .. (body or object) .. "\n\n")
  set_usage(handle, {prompt_tokens = 0, completion_tokens = 0, source = "final"})
  return nil
end

-- Whether the first `key` in `event` is followed by a non-empty string. Plain finds and anchored
-- matches only: an unanchored pattern is tried at every byte, and this runs for every event.
local function has_text(event, key)
  local _, stop = event:find(key, 1, true)
  return stop ~= nil and event:find('^%s*:%s*"[^"]', stop + 1) ~= nil
end

local function after_key(event, key, pattern)
  local _, stop = event:find(key, 1, true)
  return stop ~= nil and event:find(pattern, stop + 1) ~= nil
end

-- The bytes Lua's `%s` matches, and the comma.
local SPACE = { [9] = true, [10] = true, [11] = true, [12] = true, [13] = true, [32] = true }
local COMMA = 44

-- `event` without the member that starts at `key` and ends at `last`, and its separating comma (the one
-- before it, else the one after). Stepped byte by byte: the pattern this was (`^(.-),%s*$` on what
-- precedes the member) is retried at every byte, ~20,000 instructions an event, and every event of a
-- worker that forces usage has this member (callgrind: 180,000 of a short stream's 990,000).
local function without(event, key, last)
  local at = key - 1
  while SPACE[event:byte(at)] do at = at - 1 end
  if event:byte(at) == COMMA then return event:sub(1, at - 1) .. event:sub(last + 1) end
  local after = last + 1
  while SPACE[event:byte(after)] do after = after + 1 end
  if event:byte(after) == COMMA then return event:sub(1, key - 1) .. event:sub(after + 1) end
  return event:sub(1, key - 1) .. event:sub(last + 1)
end

local function rewrite_stream(handle)
  local request = handle:streamInfo():dynamicMetadata():get(REQUEST)
  local asked = request ~= nil and request["include_usage"] == true
  local pending, model, usage, final, counted = "", nil, nil, false, 0
  local written, written_model = nil, nil -- the kind of figures (source) and the model last written whole
  local first, failed = true, false
  -- Chat and completions chunks (`object`) get their forced usage hidden; typed event streams (the
  -- Responses API's `response.*`) carry usage only in their terminal event, which the client keeps.
  local typed = nil
  for chunk in handle:bodyChunks() do
    local bytes = chunk:getBytes(0, chunk:length())
    if pending ~= "" then bytes = pending .. bytes end
    if first and bytes:find("^%s*{") then failed = true end
    if #bytes > 0 then first = false end
    if failed == "answered" or (failed and #bytes > HOLD_MAX) then
      chunk:setBytes("") -- nothing after the error object is for the client
      pending = ""
    elseif failed then
      pending = stream_error(handle, chunk, bytes) or ""
      if pending == "" then failed = "answered" end
    else
      local out, pos, changed, seen = {}, 1, pending ~= "", false
      while true do
        local _, stop = bytes:find("\n\n", pos, true)
        if stop == nil then break end
        local event = bytes:sub(pos, stop)
        pos = stop + 1
        if model == nil then model = first_model(event) end
        if typed == nil then typed = event:find('"object"%s*:%s*"[%w_.]*completion') == nil end
        if has_text(event, '"content"') or has_text(event, '"text"') or (typed and has_text(event, '"delta"')) then
          counted = counted + 1
          seen = true
        end
        local key = event:find('"usage"', 1, true)
        if key and typed then
          local value_from = event:find("^%s*:%s*%b{}", key + 7)
          if value_from then usage, seen, final = event:match("%b{}", value_from), true, true end
        elseif key then
          local value_from, value_to = event:find("^%s*:%s*%b{}", key + 7)
          local closing = after_key(event, '"choices"', "^%s*:%s*%[%s*%]")
          if value_from then
            usage, seen, changed = event:match("%b{}", value_from), true, true
            final = final or closing
            if not closing then event = without(event, key, value_to) end
          end
          if closing and not asked then event, changed = "", true end
        end
        out[#out + 1] = event
      end
      pending = bytes:sub(pos)
      if #pending > HOLD_MAX then
        out[#out + 1] = pending
        pending = ""
      end
      if changed or pending ~= "" then chunk:setBytes(table.concat(out)) end
      if seen then
        -- Whole once for each kind of figure, then the growing count alone beside it (meter/parse.py):
        -- one number costs Envoy a fifth of an object, and a stream writes one every chunk.
        local source = usage and (final and "final" or "partial") or "counted"
        if source ~= written or model ~= written_model then
          if usage then
            set_usage(handle, usage_entry(usage, model, source))
          else
            set_usage(handle, {completion_tokens = counted, model = model, source = source})
          end
          written, written_model = source, model
        else
          handle:streamInfo():dynamicMetadata():set(USAGE, "completion_tokens",
            usage and select(2, token_figures(usage)) or counted)
        end
      end
    end
  end
end

local function scan_large(handle, length)
  local seen, head, tail = 0, nil, {}
  for chunk in handle:bodyChunks() do
    local size = chunk:length()
    if head == nil then head = chunk:getBytes(0, math.min(size, EDGE)) end
    if seen + size > length - EDGE then
      local from = math.max(length - EDGE - seen, 0)
      tail[#tail + 1] = chunk:getBytes(from, size - from)
    end
    seen = seen + size
  end
  record_usage(handle, (head or "") .. "\n" .. table.concat(tail))
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
  if path:find("/v1/audio/speech", -16, true) then
    speech_units(handle)
  elseif path:find("/v1/images/generations", -22, true) then
    image_units(handle)
  end
end

function envoy_on_response(handle)
  -- Only requests ext_authz allowed and forwarded reach these two routes (envoy.yaml, "runpod").
  local route = handle:streamInfo():routeName()
  if route ~= "runpod" and route ~= "managed" then return end
  local headers = handle:headers()
  local status = tonumber(headers:get(":status")) or 0

  if status == 200 then
    local content_type = headers:get("content-type") or ""
    if content_type:find("text/event-stream", 1, true) then
      headers:remove("content-length") -- events change size as they are rewritten
      rewrite_stream(handle)
      return
    end
    -- Synthesized speech, streamed or whole: its bytes are the client's, as they come.
    if content_type:find("^audio/") or content_type:find("octet-stream", 1, true) then return end
    local length = tonumber(headers:get("content-length"))
    if length ~= nil and length > BUFFER_MAX then
      scan_large(handle, length)
      return
    end
    local body = handle:body()
    local bytes = body:getBytes(0, body:length())
    local code, error = worker_error(bytes)
    if code then
      replace(handle, code, error)
    else
      record_usage(handle, bytes)
    end
  elseif (status == 401 or status == 403) and route == "managed" then
    -- The platform's own key: nothing the customer can fix, so nothing to reconnect and no customer
    -- credential to mark; operators see this line and envoy_cluster_upstream_rq{managed, 401|403}.
    replace(handle, 503, error_body(
      "The managed inference service is temporarily unavailable. Please retry later.",
      "server_error", "service_unavailable"))
    handle:logErr("managed destination: RunPod refused the platform's API key (HTTP " .. status
      .. "); check GATEWAY_MANAGED_API_KEY")
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
