-- Automatic routing from Orthanc to the dicom-node AI node (Orthanc 1.10 or later, built-in Lua).
--
-- Prefer orthanc/autoroute.py (Orthanc's Python plugin, Debian package orthanc-python) where the
-- plugin is available: the same rules and metadata names, and it retries on a timer on any
-- Orthanc from 1.10. This Lua script retries on a timer only from Orthanc 1.11.1 (OnHeartBeat);
-- on 1.10 its retries wait for the next event (a study becoming stable, a restart).
--
-- When a study becomes stable (no new instance for "StableAge" seconds), the series that match
-- the filter below are sent to the node, registered in "DicomModalities" under TARGET. The node
-- writes its results (SR, SEG) back into the same study; that makes the study stable again, and
-- this script then sends nothing: the node's own output is never routed, and a series already
-- sent is sent again only if it gained instances since.
--
-- What was sent is remembered per series in the user metadata ROUTED (the instance count at the
-- time), so it survives restarts. It is written only once the store job has succeeded.
--
-- Nothing is missed when the node is down: a study not yet accepted by the node carries the
-- study-level user metadata PENDING ("<attempts> <next attempt, Unix time>") and is sent again
-- with exponential back-off (RETRY_FIRST doubling up to RETRY_MAX seconds) until a store job
-- succeeds. On start-up (Initialize) the queue is rebuilt from that metadata, so it survives an
-- Orthanc restart; when one study gets through, every waiting study is tried at once. Declare
-- both names in the configuration:
--     "UserMetadata": { "AiNodeRouted": 1024, "AiNodePending": 1025 }
--
-- When retries run: Orthanc >= 1.11.1 calls OnHeartBeat every "LuaHeartBeatPeriod" seconds
-- (set in orthanc.json), which retries every study whose time has come. Orthanc 1.10 (Debian 12)
-- has no timer in Lua, and anything that waits inside a Lua callback holds Orthanc's Lua lock,
-- which every REST request and every received instance also takes; so there the queue is
-- retried on events instead: at start-up, whenever any study becomes stable, and when any of
-- its store jobs ends. On 1.10 let the node pull what it misses as well (a [[pull]] schedule on
-- the node, see README.md).
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
local ROUTED = 'AiNodeRouted'    -- series user metadata (see above)
local PENDING = 'AiNodePending'  -- study user metadata (see above)
local RETRY_FIRST = 10           -- seconds before the first retry of a study the node did not take
local RETRY_MAX = 600            -- back-off ceiling, seconds
------------------------------------------------------------------------------

local jobs = {}                  -- store job ID -> { study = ID, marks = series to mark }
local queue = {}                 -- study ID -> { attempts = n, due = Unix time }, mirrors PENDING
local inFlight = {}              -- study ID -> store job ID

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

local function hasMetadata(path, name)
  -- GET .../metadata lists the names; asking for a missing one is an error.
  local ok, names = pcall(RestApiGet, path .. '/metadata')
  if not ok then
    return false
  end
  for _, found in ipairs(ParseJson(names)) do
    if found == name then
      return true
    end
  end
  return false
end

local function delay(attempts)
  return math.floor(math.min(RETRY_FIRST * 2 ^ math.max(attempts - 1, 0), RETRY_MAX))
end

local function remember(studyId, attempts, due)
  queue[studyId] = { attempts = attempts, due = due }
  pcall(RestApiPut, '/studies/' .. studyId .. '/metadata/' .. PENDING, attempts .. ' ' .. due)
end

local function forget(studyId)
  queue[studyId] = nil
  if hasMetadata('/studies/' .. studyId, PENDING) then
    pcall(RestApiDelete, '/studies/' .. studyId .. '/metadata/' .. PENDING)
  end
end

local function seriesToSend(studyId)
  local ok, answer = pcall(RestApiGet, '/studies/' .. studyId .. '/series')
  if not ok then
    return nil -- the study was deleted meanwhile
  end
  local resources = {}
  local marks = {}
  for _, series in ipairs(ParseJson(answer)) do
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
  return resources, marks
end

local function route(studyId)
  if inFlight[studyId] ~= nil then
    return false -- its job will report; a newer stable event is looked at again then
  end
  local resources, marks = seriesToSend(studyId)
  if resources == nil or #resources == 0 then
    forget(studyId)
    return false
  end
  local attempts = (queue[studyId] or { attempts = 0 }).attempts
  -- Pending before the job starts: a crash or restart while it runs still retries the study.
  remember(studyId, attempts, os.time() + delay(attempts + 1))
  local request = { Resources = resources, Asynchronous = true, Permissive = false }
  local answer = ParseJson(RestApiPost('/modalities/' .. TARGET .. '/store', DumpJson(request, true)))
  jobs[answer['ID']] = { study = studyId, marks = marks }
  inFlight[studyId] = answer['ID']
  log('study ' .. studyId .. ': sending ' .. #resources .. ' series to ' .. TARGET .. ' (job ' .. answer['ID'] .. ', attempt ' .. (attempts + 1) .. ')')
  return true
end

local function retryDue(everything)
  local now = os.time()
  local sent = false
  for studyId, entry in pairs(queue) do
    if inFlight[studyId] == nil and (everything or entry.due <= now) then
      sent = route(studyId) or sent
    end
  end
  return sent
end

function Initialize()
  -- Rebuild the queue from PENDING: one metadata read per study, in pages.
  local since = 0
  local page = 1000
  repeat
    local ids = ParseJson(RestApiGet('/studies?since=' .. since .. '&limit=' .. page))
    for _, studyId in ipairs(ids) do
      if hasMetadata('/studies/' .. studyId, PENDING) then
        local value = RestApiGet('/studies/' .. studyId .. '/metadata/' .. PENDING)
        queue[studyId] = { attempts = tonumber(string.match(value, '^(%d+)')) or 0, due = 0 }
      end
    end
    since = since + page
  until #ids < page
  local waiting = 0
  for _ in pairs(queue) do
    waiting = waiting + 1
  end
  if waiting > 0 then
    log(waiting .. ' studies not yet accepted by ' .. TARGET .. ': sending them again')
    retryDue(true)
  end
end

function OnHeartBeat()
  retryDue(false)
end

function OnStableStudy(studyId, tags, metadata)
  route(studyId)
  retryDue(false)
end

function OnJobSuccess(jobId)
  local job = jobs[jobId]
  if job == nil then
    return
  end
  jobs[jobId] = nil
  inFlight[job.study] = nil
  for _, mark in ipairs(job.marks) do
    RestApiPut('/series/' .. mark.id .. '/metadata/' .. ROUTED, tostring(mark.count))
  end
  -- Done, unless instances arrived while the job ran: then those series go now.
  queue[job.study] = nil
  route(job.study)
  -- The node takes studies again: whatever waits goes now, not at its back-off time.
  retryDue(true)
end

function OnJobFailure(jobId)
  local job = jobs[jobId]
  if job == nil then
    return
  end
  jobs[jobId] = nil
  inFlight[job.study] = nil
  local attempts = (queue[job.study] or { attempts = 0 }).attempts + 1
  local wait = delay(attempts)
  remember(job.study, attempts, os.time() + wait)
  log('job ' .. jobId .. ' could not send study ' .. job.study .. ' to ' .. TARGET .. ' (attempt ' .. attempts .. '); next attempt in ' .. wait .. ' s or at the next event')
  retryDue(false)
end
