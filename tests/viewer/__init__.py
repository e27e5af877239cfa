"""OHIF viewer test harness: OHIF's prebuilt static build behind a loopback static+proxy server
in front of Orthanc, driven by Debian Chromium through npm ``playwright-core``."""
