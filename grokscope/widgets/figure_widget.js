// grokscope's figure widget: plotly's own FigureWidget front end, sent by the kernel once per
// page instead of being stored with every widget (5 MB each).
//
// Nothing here waits for the kernel during `initialize`: JupyterLab handles a kernel's messages
// one after another, and the model is created while the message that opened it is handled.
// The first `render` asks for the bundle, then for the figure's current state, and starts
// plotly's model in the handler of that reply, so no later update can slip past it.
const BUNDLE = "__grokscopePlotlyWidget";

function loadBundle(model) {
  if (!window[BUNDLE]) {
    window[BUNDLE] = new Promise((resolve, reject) => {
      const onMessage = async (msg, buffers) => {
        if (!msg || msg.type !== "grokscope:bundle") { return; }
        model.off("msg:custom", onMessage);
        try {
          const url = URL.createObjectURL(new Blob([buffers[0]], { type: "text/javascript" }));
          resolve(await import(/* webpackIgnore: true */ url));
        } catch (error) {
          window[BUNDLE] = undefined;
          reject(error);
        }
      };
      model.on("msg:custom", onMessage);
      model.send({ type: "grokscope:bundle-request" });
    });
  }
  return window[BUNDLE];
}

function whenSynced(model, start) {
  return new Promise((resolve) => {
    const onMessage = (msg) => {
      if (!msg || msg.type !== "grokscope:synced") { return; }
      model.off("msg:custom", onMessage);
      start();
      resolve();
    };
    model.on("msg:custom", onMessage);
    model.send({ type: "grokscope:sync" });
  });
}

function hideStaticCopy(model) {
  const view = model.get("_grokscope_view");
  const id = `grokscope-live-${view}`;
  if (!view || document.getElementById(id)) { return; }
  const style = document.createElement("style");
  style.id = id;
  style.textContent = `.grokscope-static[data-view="${view}"] { display: none; }`;
  document.head.appendChild(style);
}

export default () => {
  let initContext;
  let inner;
  let ready;
  return {
    initialize(context) {
      initContext = context;
    },
    async render(context) {
      if (!ready) {
        ready = loadBundle(initContext.model).then((module) => whenSynced(initContext.model, () => {
          inner = module.default();
          if (inner.initialize) { inner.initialize(initContext); }
        }));
      }
      await ready;
      const cleanup = await inner.render(context);
      hideStaticCopy(context.model);
      return cleanup;
    },
  };
};
