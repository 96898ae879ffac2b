-- Hands what ext_authz needs to know of the request body, which never travels to ext_authz, as one
-- header, x-gateway-body: `name=value` pairs joined by `&` (extauth/body_facts.py reads them):
-- `model` (lifted by json_to_metadata just before), percent-escaped; the body's size `bytes` (Envoy
-- sends ext_authz a check with content-length 0); and, when the body states them, its completion budget
-- `max_tokens` (`max_completion_tokens`, else `max_tokens`, else the Responses API's
-- `max_output_tokens`) and its choice count `n`: together they size a managed request's spend
-- reservation. One header for all of them: each header added here costs Envoy ~9,500 instructions a
-- request (copied into the check, listed for removal, dropped).
--
-- A client's own x-gateway-* headers never get this far (envoy.yaml removes them before routing), so
-- the header can only carry the body's values. The model is percent-escaped (control characters,
-- spaces, "%", "&", DEL and non-ASCII bytes): a model name is client input and may hold bytes no
-- header may carry, spaces a header would trim or the pairs' separator; ext_authz unescapes it. A
-- count is passed only when it is a whole number a request could mean; anything else is left to the
-- upstream to refuse.
--
-- Without a string `model`, what is wrong with the body is the one fact, `error` (extauth/errors.py
-- words it): `not_json` (not a JSON content type), `invalid_json` (unparseable or not UTF-8),
-- `not_object` (valid JSON, but not an object), `model_type` (`model` is not a string). Only this
-- failure path looks at the body; the common path reads the lifted metadata fields.
--
-- The voice routes (/v1/audio/transcriptions, /v1/audio/translations) send multipart/form-data, which
-- json_to_metadata does not read: for them only, the buffered body's `model` form field is handed over
-- the same way, and the duration of WAV `file`s (the RIFF header: data bytes / byte rate) as
-- `audio_seconds` (it sizes the spend reservation) and into `gateway.usage:units` (the metered audio
-- seconds unless the upstream's answer reports its own, envoy/gateway.lua).

local BODY = "envoy.filters.http.json_to_metadata"
local HEADER = "x-gateway-body"
local USAGE = "gateway.usage"
local VOICE_PATHS = { ["/v1/audio/transcriptions"] = true, ["/v1/audio/translations"] = true }

local function escape(value)
  return (value:gsub("[%c%%& \127-\255]", function(c) return string.format("%%%02X", c:byte()) end))
end

-- The facts of every body with a model: the model and, when stated, the body's size.
local function model_facts(model, headers)
  local length = headers:get("content-length")
  return "model=" .. escape(model) .. (length and "&bytes=" .. length or "")
end

local function count(value)
  if type(value) == "number" and value >= 0 and value < 2147483648 and value == math.floor(value) then
    return string.format("%d", value)
  end
  return nil
end

local function u32(text, at)
  local a, b, c, d = text:byte(at, at + 3)
  return a + b * 256 + c * 65536 + d * 16777216
end

-- Seconds of audio in a WAV file that starts at `from` in `text` and ends before `to`, or nil.
local function wav_seconds(text, from, to)
  if text:sub(from, from + 3) ~= "RIFF" or text:sub(from + 8, from + 11) ~= "WAVE" then return nil end
  local at, rate = from + 12, nil
  while at + 8 <= to do
    local id, size = text:sub(at, at + 3), u32(text, at + 4)
    if id == "fmt " then
      if at + 20 > to then return nil end
      rate = u32(text, at + 16) -- byte rate
    elseif id == "data" then
      if not rate or rate == 0 then return nil end
      -- A streamed WAV states no size (0 or 0xFFFFFFFF): the bytes that are there count.
      return math.min(size, to - (at + 8)) / rate
    end
    at = at + 8 + size + size % 2
  end
  return nil
end

-- The `model` form field and the audio seconds of the `file` parts of a multipart body: the sum of
-- their WAV durations, or false when one is not a WAV file (nil: no file).
local function multipart(handle, content_type)
  local boundary = (content_type or ""):match('^multipart/form%-data;.-boundary="?([^";]+)"?')
  if not boundary then return nil end
  local buffered = handle:body()
  if not buffered then return nil end
  local text = buffered:getBytes(0, buffered:length())
  local delimiter = "--" .. boundary
  local model, seconds
  local _, stop = text:find(delimiter, 1, true)
  while stop do
    local head_end = text:find("\r\n\r\n", stop, true)
    if not head_end then break end
    local next_start, next_stop = text:find("\r\n" .. delimiter, head_end + 4, true)
    if not next_start then break end
    local head = text:sub(stop + 1, head_end):lower()
    -- `[; ]name=`: not the end of `filename=`.
    if head:find('[; ]name="model"') then
      model = model or text:sub(head_end + 4, next_start - 1)
    elseif head:find('[; ]name="file"') and seconds ~= false then
      local part = wav_seconds(text, head_end + 4, next_start)
      seconds = part and (seconds or 0) + part or false
    end
    stop = next_stop
  end
  return model, seconds
end

-- Whether this is a voice route (then its form fields are handed over, when there are any).
local function voice(handle, headers)
  local path = (headers:get(":path") or ""):match("^[^?]*")
  if not VOICE_PATHS[path] then return false end
  local model, seconds = multipart(handle, headers:get("content-type"))
  if not model then return true end
  headers = handle:headers() -- body() waited for the whole body: the old wrapper is gone
  local facts = model_facts(model, headers)
  if seconds then facts = facts .. string.format("&audio_seconds=%.3f", seconds) end
  headers:add(HEADER, facts)
  if seconds then
    handle:streamInfo():dynamicMetadata():set(USAGE, "units",
      { unit = "audio_second", quantity = math.floor(seconds * 1000 + 0.5) / 1000, detail = "wav" })
  elseif seconds == false then
    -- Not measured here: the upstream's usage, if its answer has one, is the only figure (meter/parse.py
    -- marks the row estimated otherwise).
    handle:streamInfo():dynamicMetadata():set(USAGE, "units",
      { unit = "audio_second", quantity = 0, detail = "unmeasured" })
  end
  return true
end

-- json_to_metadata reports a missing `model` both for `{}` and for `[...]` or `{"model": [..]}`.
local function shape_of(handle)
  local body = handle:body()
  if body == nil then return nil end
  local head = body:getBytes(0, math.min(body:length(), 65536))
  local first = head:match("^%s*(.)")
  if first == nil then return nil end
  if first ~= "{" then return "not_object" end
  -- Only a top-level key matters; a "model" nested deeper (inside messages) may mislead this scan,
  -- which then reports a wrong type instead of a missing model: either way the request is refused.
  if head:find('"model"%s*:%s*[%[{n]') then return "model_type" end
  return nil
end

function envoy_on_request(handle)
  local body = handle:streamInfo():dynamicMetadata():get(BODY)
  local model = body and body["model"]
  local headers = handle:headers()
  if type(model) == "string" then
    local facts = model_facts(model, headers)
    local budget = count(body["max_completion_tokens"]) or count(body["max_tokens"])
      or count(body["max_output_tokens"]) -- the Responses API's
    if budget then facts = facts .. "&max_tokens=" .. budget end
    local choices = count(body["n"])
    if choices then facts = facts .. "&n=" .. choices end
    headers:add(HEADER, facts)
    return
  end
  -- Not JSON: a voice route's multipart form, or a body to refuse.
  if (body == nil or body["unparsed"]) and voice(handle, headers) then return end
  local fact
  if model ~= nil then
    fact = "model_type"
  elseif body == nil then
    return
  elseif body["unparsed"] then
    local content_type = headers:get("content-type") or ""
    fact = content_type:find("^application/json") and "invalid_json" or "not_json"
  elseif body["no_model"] then
    fact = shape_of(handle)
  end
  -- Fetched afresh: shape_of may have waited for the body, and wrapper objects do not survive that.
  if fact then handle:headers():add(HEADER, "error=" .. fact) end
end
