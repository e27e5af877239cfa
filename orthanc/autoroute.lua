-- Automatic routing from Orthanc to the dicom-node AI node (Orthanc 1.10 or later, built-in Lua).
--
-- When a study becomes stable (no new instance for "StableAge" seconds), the series that match
-- the filter below are sent to the node, registered in "DicomModalities" under TARGET. The node
-- writes its results (SR, SEG) back into the same study; that makes the study stable again, and
-- this script then sends nothing: the node's own output is never routed, and a series already
-- sent is sent again only if it gained instances since.
--
-- What was sent is remembered per series in the user metadata ROUTED (the instance count at the
-- time), so it survives restarts. Declare it in the configuration:
--     "UserMetadata": { "AiNodeRouted": 1024 }
-- It is written only once the store job has succeeded: if the node was down, the study is sent
-- again the next time it becomes stable, or by hand (POST /modalities/ainode/store).
--
-- Logs name Orthanc's opaque identifiers only, never patient data.

------------------------------------------------------------------------------ settings
local TARGET = 'ainode'          -- the node's name in "DicomModalities"
local MODALITIES = { CT = true } -- series modalities to route, e.g. { CT = true, MR = true }
local BODY_PART = nil            -- Lua pattern on BodyPartExamined (e.g. 'CHEST'); nil = any
local MIN_INSTANCES = 1          -- skip series with fewer instances (e.g. 16 to skip scouts)
local NEVER_ROUTE = { SR = true, SEG = true, KO = true, PR = true, RTSTRUCT = true, DOC = true }
local OUR_MARKS = {              -- a series is the node's own output when any of these match
  Manufacturer = '^dicom%-node$', --   (Lua patterns on the first instance's tags)
  SeriesDescription = '^AI:',
  ContentCreatorName = '^dicom%-node$',
}
local ROUTED = 'AiNodeRouted'    -- user metadata (see above)
------------------------------------------------------------------------------

local pending = {}               -- store job ID -> series to mark once the job succeeded

local function log(message)
  print('dicom-node auto-route: ' .. message)
end

local function matches(value, pattern)
  return value ~= nil and pattern ~= nil and string.find(tostring(value), pattern) ~= nil
end

local function isOurOutput(modality, tags)
  if NEVER_ROUTE[modality] then
    return true
  end
  for keyword, pattern in pairs(OUR_MARKS) do
    if matches(tags[keyword], pattern) then
      return true
    end
  end
  return false
end

local function wanted(modality, tags, count)
  if not MODALITIES[modality] then
    return false
  end
  if count < MIN_INSTANCES then
    return false
  end
  if BODY_PART ~= nil and not matches(string.upper(tags['BodyPartExamined'] or ''), BODY_PART) then
    return false
  end
  return true
end

local function routedCount(seriesId)
  -- GET /series/{id}/metadata lists the metadata names; asking for a missing one is an error.
  for _, name in ipairs(ParseJson(RestApiGet('/series/' .. seriesId .. '/metadata'))) do
    if name == ROUTED then
      return tonumber(RestApiGet('/series/' .. seriesId .. '/metadata/' .. ROUTED)) or 0
    end
  end
  return 0
end

function OnStableStudy(studyId, tags, metadata)
  local resources = {}
  local marks = {}
  for _, series in ipairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
    local instances = series['Instances']
    local count = #instances
    if count > 0 then
      local modality = series['MainDicomTags']['Modality'] or ''
      local first = ParseJson(RestApiGet('/instances/' .. instances[1] .. '/simplified-tags'))
      if isOurOutput(modality, first) then
        -- the node's own result (or another derived object): never sent back to it
      elseif wanted(modality, first, count) and routedCount(series['ID']) ~= count then
        table.insert(resources, series['ID'])
        table.insert(marks, { id = series['ID'], count = count })
      end
    end
  end
  if #resources == 0 then
    return
  end
  local request = { Resources = resources, Asynchronous = true, Permissive = false }
  local answer = ParseJson(RestApiPost('/modalities/' .. TARGET .. '/store', DumpJson(request, true)))
  pending[answer['ID']] = marks
  log('study ' .. studyId .. ': sending ' .. #resources .. ' series to ' .. TARGET .. ' (job ' .. answer['ID'] .. ')')
end

function OnJobSuccess(jobId)
  local marks = pending[jobId]
  if marks == nil then
    return
  end
  pending[jobId] = nil
  for _, mark in ipairs(marks) do
    RestApiPut('/series/' .. mark.id .. '/metadata/' .. ROUTED, tostring(mark.count))
  end
end

function OnJobFailure(jobId)
  if pending[jobId] ~= nil then
    pending[jobId] = nil
    log('job ' .. jobId .. ' could not send to ' .. TARGET .. '; the study is sent again when it next becomes stable')
  end
end
