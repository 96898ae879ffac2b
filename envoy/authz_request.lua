-- Hands the request body's `model` (lifted by json_to_metadata just before) to ext_authz as the
-- header x-gateway-model, so the body itself never travels to ext_authz; and, when the body states
-- them, its completion budget (`max_completion_tokens`, else `max_tokens`) as x-gateway-max-tokens and
-- its choice count `n` as x-gateway-choices, and the body's size as x-gateway-body-bytes (Envoy sends
-- ext_authz a check with content-length 0): together they size a managed request's spend reservation.
--
-- A client's own x-gateway-* headers never get this far (envoy.yaml removes them before routing), so
-- the headers can only carry the body's values. The model is percent-escaped (control characters,
-- spaces, "%", DEL and non-ASCII bytes): a model name is client input and may hold bytes no header may
-- carry, or spaces a header would trim; ext_authz unescapes it. A count is passed only when it is a
-- whole number a request could mean; anything else is left to the upstream to refuse.
--
-- Without a string `model`, what is wrong with the body goes in x-gateway-body (extauth/errors.py
-- words it): `not_json` (not a JSON content type), `invalid_json` (unparseable or not UTF-8),
-- `not_object` (valid JSON, but not an object), `model_type` (`model` is not a string). Only this
-- failure path looks at the body; the common path reads the lifted metadata fields.

local BODY = "envoy.filters.http.json_to_metadata"
local HEADER = "x-gateway-model"
local MAX_TOKENS = "x-gateway-max-tokens"
local CHOICES = "x-gateway-choices"
local BODY_BYTES = "x-gateway-body-bytes"
local FACT = "x-gateway-body"

local function escape(value)
  return (value:gsub("[%c%% \127-\255]", function(c) return string.format("%%%02X", c:byte()) end))
end

local function count(value)
  if type(value) == "number" and value >= 0 and value < 2147483648 and value == math.floor(value) then
    return string.format("%d", value)
  end
  return nil
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
    headers:add(HEADER, escape(model))
    local length = headers:get("content-length")
    if length then headers:add(BODY_BYTES, length) end
    local budget = count(body["max_completion_tokens"]) or count(body["max_tokens"])
    if budget then headers:add(MAX_TOKENS, budget) end
    local choices = count(body["n"])
    if choices then headers:add(CHOICES, choices) end
    return
  end
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
  if fact then handle:headers():add(FACT, fact) end
end
