-- Hands the request body's `model` (lifted by json_to_metadata just before) to ext_authz as the
-- header x-gateway-model, so the body itself never travels to ext_authz.
--
-- A client's own x-gateway-model never gets this far (envoy.yaml removes it before routing), so the
-- header can only carry the body's value. The value is percent-escaped (control characters, spaces,
-- "%", DEL and non-ASCII bytes): a model name is client input and may hold bytes no header may carry,
-- or spaces a header would trim; ext_authz unescapes it.

local BODY = "envoy.filters.http.json_to_metadata"
local HEADER = "x-gateway-model"

local function escape(value)
  return (value:gsub("[%c%% \127-\255]", function(c) return string.format("%%%02X", c:byte()) end))
end

function envoy_on_request(handle)
  local body = handle:streamInfo():dynamicMetadata():get(BODY)
  local model = body and body["model"]
  if type(model) == "string" then handle:headers():add(HEADER, escape(model)) end
end
