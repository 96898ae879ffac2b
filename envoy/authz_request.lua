-- For the voice routes only (/v1/audio/transcriptions, /v1/audio/translations; envoy.yaml enables this
-- filter on their route and nowhere else): they send multipart/form-data, which json_to_metadata does
-- not read. The buffered body's `model` form field and the duration of its WAV `file`s (the RIFF
-- header: data bytes / byte rate) go to ext_authz as one header, x-gateway-form: `name=value` pairs
-- joined by `&` (extauth/body_facts.py reads them): `model`, percent-escaped (control characters,
-- spaces, "%", "&", DEL and non-ASCII bytes: a model name is client input and may hold bytes no header
-- may carry, spaces a header would trim or the pairs' separator), the body's size `bytes`, and
-- `audio_seconds` (it sizes the spend reservation). The seconds also go into `gateway.usage:units` (the
-- metered audio seconds unless the upstream's answer reports its own, envoy/gateway.lua).
--
-- Every other body's facts reach ext_authz without Lua: json_to_metadata's namespace, in the check's
-- x-gateway-body header (envoy.yaml). A client's own x-gateway-* headers never get this far (envoy.yaml
-- removes them before routing), so the header can only carry the body's values.

local HEADER = "x-gateway-form"
local USAGE = "gateway.usage"

local function escape(value)
  return (value:gsub("[%c%%& \127-\255]", function(c) return string.format("%%%02X", c:byte()) end))
end

-- The model and, when stated, the body's size.
local function model_facts(model, headers)
  local length = headers:get("content-length")
  return "model=" .. escape(model) .. (length and "&bytes=" .. length or "")
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

function envoy_on_request(handle)
  local content_type = handle:headers():get("content-type")
  -- Not a form (a JSON body, say): json_to_metadata's facts are the ones.
  if not (content_type or ""):find("^multipart/form%-data") then return end
  local model, seconds = multipart(handle, content_type)
  local headers = handle:headers() -- body() waited for the whole body: the old wrapper is gone
  -- A form without a `model` still says it is a form: ext_authz then asks for one.
  local facts = model and model_facts(model, headers) or "form=1"
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
end
