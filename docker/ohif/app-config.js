/* OHIF configuration for the dicom-node compose setup (replaces the build's app-config.js).
 *
 * OHIF is served at the origin root by the `viewer` nginx service, which also proxies
 * /dicom-web and /wado to Orthanc and adds Orthanc's credentials. The data source therefore uses
 * relative URLs: the browser talks to one origin only (Orthanc sends no CORS headers) and never
 * sees Orthanc's password. The proxy passes the Host header through, so the BulkDataURIs that
 * Orthanc writes into the metadata point back at the proxy as well.
 *
 * Study links from the dicom-node dashboard open <viewer>/viewer?StudyInstanceUIDs=<uid>.
 */
window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'PACS (Orthanc)',
        name: 'orthanc',
        wadoUriRoot: '/wado',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video,pdf',
        bulkDataURI: { enabled: true },
        omitQuotationForMultipartRequest: true,
        // The proxy is read-only (GET only): no uploads from the viewer.
        dicomUploadEnabled: false,
      },
    },
  ],
};
