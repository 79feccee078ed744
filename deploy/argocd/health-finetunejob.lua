-- Argo CD resource health check for kubetune.io/FineTuneJob.
-- Install it under resource.customizations.health.kubetune.io_FineTuneJob in argocd-cm
-- (deploy/argocd/argocd-cm-patch.yaml carries this script; a test keeps the two identical).
--
--   Healthy      the model is served (Deployed), or training succeeded and nothing is to be served
--                (deploy disabled, not improved enough, scaled to zero)
--   Degraded     the job failed, its spec is invalid, a training-field change was rejected, or serving
--                needs a person (ReplicaFailure, ProgressDeadlineExceeded, ModelUnavailable, ...)
--   Suspended    spec.suspend is true or the RayJob is suspended
--   Progressing  everything else: waiting for the operator, queued, training, deploying
-- Messages come from the conditions the operator writes (reason: message).

local hs = { status = "Progressing", message = "Waiting for the kubetune operator" }

local function condition(status, ctype)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

-- Numbers arrive as floats (JSON); print whole ones without a fraction on every Lua version.
local function num(x)
  if type(x) == "number" and x == math.floor(x) then
    return string.format("%d", x)
  end
  return tostring(x)
end

local function is_true(status, ctype)
  local c = condition(status, ctype)
  return c ~= nil and c.status == "True"
end

local function describe(c, fallback)
  if c == nil then
    return fallback
  end
  local reason = c.reason or ""
  local message = c.message or ""
  if reason ~= "" and message ~= "" then
    return reason .. ": " .. message
  end
  if message ~= "" then
    return message
  end
  if reason ~= "" then
    return reason
  end
  return fallback
end

local status = obj.status
local spec = obj.spec or {}
local meta = obj.metadata or {}

if status == nil then
  return hs
end

if meta.generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < meta.generation then
  hs.message = "Waiting for the operator to observe generation " .. num(meta.generation)
  return hs
end

if is_true(status, "Failed") then
  hs.status = "Degraded"
  hs.message = describe(condition(status, "Failed"), "Training failed")
  return hs
end

local validated = condition(status, "Validated")
if validated ~= nil and validated.status == "False" then
  hs.status = "Degraded"
  hs.message = describe(validated, "The spec is invalid")
  return hs
end

if status.state == "Failed" then
  hs.status = "Degraded"
  hs.message = "Training failed"
  return hs
end

if is_true(status, "SpecChangeRejected") then
  hs.status = "Degraded"
  hs.message = describe(condition(status, "SpecChangeRejected"), "A spec change was rejected")
  return hs
end

if spec.suspend == true or is_true(status, "Suspended") or status.state == "Suspended" then
  hs.status = "Suspended"
  hs.message = describe(condition(status, "Suspended"), "Suspended")
  return hs
end

local deployed = condition(status, "Deployed")
if (deployed ~= nil and deployed.status == "True") or status.state == "Deployed" then
  hs.status = "Healthy"
  local endpoint = status.endpoint or {}
  if endpoint.url ~= nil then
    hs.message = "Serving " .. tostring(endpoint.model or obj.metadata.name) .. " at " .. endpoint.url
  else
    hs.message = describe(deployed, "Deployed")
  end
  return hs
end

-- Deployed=False reasons (kubetune_operator.conditions): nothing is meant to serve now, or serving needs a
-- person; any other reason means serving is on its way.
local NOT_SERVING_ON_PURPOSE = { Disabled = true, NotImproved = true, ScaledToZero = true }
local SERVING_NEEDS_ATTENTION = { ProgressDeadlineExceeded = true, ReplicaFailure = true, ModelUnavailable = true,
  UnsupportedModel = true, ServingRejected = true, NameConflict = true }

if is_true(status, "Succeeded") then
  local deploy = spec.deploy or {}
  local reason = ""
  if deployed ~= nil and deployed.status == "False" then
    reason = deployed.reason or ""
  end
  if SERVING_NEEDS_ATTENTION[reason] then
    hs.status = "Degraded"
    hs.message = "Training succeeded; serving failed: " .. describe(deployed, reason)
    return hs
  end
  local skipped = NOT_SERVING_ON_PURPOSE[reason] == true
  if deploy.enabled == false or skipped then
    hs.status = "Healthy"
    local model = status.model or {}
    if model.uri ~= nil then
      hs.message = "Training succeeded; model at " .. model.uri
    else
      hs.message = describe(condition(status, "Succeeded"), "Training succeeded")
    end
    if skipped then
      hs.message = hs.message .. " (not deployed: " .. describe(deployed, "skipped") .. ")"
    end
    return hs
  end
  hs.message = describe(deployed, "Training succeeded; deploying")
  return hs
end

local training = condition(status, "Training")
local progress = status.progress
if progress ~= nil and progress.step ~= nil then
  local text = "Training: step " .. num(progress.step)
  if progress.totalSteps ~= nil then
    text = text .. "/" .. num(progress.totalSteps)
  end
  if progress.percent ~= nil then
    text = text .. " (" .. num(progress.percent) .. "%)"
  end
  if progress.loss ~= nil then
    text = text .. ", loss " .. string.format("%.4g", progress.loss)
  end
  hs.message = text
  return hs
end
if training ~= nil then
  hs.message = describe(training, "Training")
  return hs
end
if status.state ~= nil then
  hs.message = tostring(status.state)
end
return hs
