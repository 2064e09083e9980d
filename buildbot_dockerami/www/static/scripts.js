// buildbot-dockerami: the Fleet page in buildbot's web UI.
// Plain JavaScript on the globals buildbot's UI exports (React, BuildbotPluginSupport),
// so it needs no build step. Data: plugins/dockerami/api/fleet, refreshed every 2 s.
(function () {
  "use strict";
  var React = window.React;
  var h = React.createElement;
  var API = "plugins/dockerami/api/fleet";
  var CONTROL = "plugins/dockerami/api/control";

  // Controls answer JSON; a refusal (403: not authorized) is shown, never hidden.
  function send(body, report) {
    return fetch(CONTROL, {method: "POST", headers: {"Content-Type": "application/json"},
                           body: JSON.stringify(body)})
      .then(function (r) { return r.json().then(function (d) { return [r.status, d]; }); })
      .then(function (res) {
        report(res[0] === 200 ? {ok: res[1].message} : {error: res[1].error || ("HTTP " + res[0])});
      }, function (e) { report({error: String(e)}); });
  }

  function button(label, className, onClick) {
    return h("button", {className: "btn btn-sm btn-default " + className, onClick: onClick,
                        style: {marginRight: "0.3em"}}, label);
  }

  function ago(seconds) {
    if (seconds == null) return "";
    var s = Math.max(0, Math.round(seconds));
    if (s < 120) return s + " s";
    if (s < 7200) return Math.round(s / 60) + " min";
    return (s / 3600).toFixed(1) + " h";
  }

  function timeline(t) {
    if (!t || t.requested == null) return "";
    var steps = [["running", "instance running"], ["connected", "worker connected"],
                 ["build_started", "build started"]];
    return ["requested"].concat(steps.filter(function (s) { return t[s[0]] != null; })
      .map(function (s) { return s[1] + " +" + (t[s[0]] - t.requested).toFixed(1) + " s"; }))
      .join(" \u2192 ");
  }

  function buildLinks(builds) {
    return builds.map(function (b) {
      return h("a", {key: b.buildid, href: "#/builders/" + b.builderid + "/builds/" + b.number,
                     className: "dockerami-build"}, b.builder + " #" + b.number);
    });
  }

  function WorkerRow(props) {
    var w = props.worker, i = w.instance || {}, report = props.report;
    var controls = [];
    if (w.state === "not running") {
      controls.push(button("Start now", "dockerami-prewarm", function () {
        send({action: "prewarm", worker: w.name}, report); }));
    }
    if (w.instance) {
      controls.push(button("Terminate", "dockerami-terminate", function () {
        send({action: "terminate", worker: w.name}, report); }));
    }
    return h("tr", {"data-worker": w.name, className: "dockerami-worker"},
      h("td", null, w.name),
      h("td", {className: "dockerami-state", title: w.last_failure || ""},
        w.state + (w.paused ? " (paused)" : "") +
        ((w.state === "quarantine" || w.state === "not running") && w.last_failure
          ? ": " + w.last_failure : "")),
      h("td", {className: "dockerami-instance"}, i.id || ""),
      h("td", null, i.type || ""),
      h("td", null, i.availability_zone || ""),
      h("td", null, i.market || ""),
      h("td", null, i.image || ""),
      h("td", null, i.launched_at ? new Date(i.launched_at * 1000).toLocaleTimeString() : ""),
      h("td", null, ago(i.uptime_seconds)),
      h("td", null, i.cost_so_far == null ? "" : "$" + i.cost_so_far.toFixed(4)),
      h("td", null, buildLinks(w.builds)),
      h("td", {className: "dockerami-timeline"}, timeline(w.timeline)),
      h("td", null, controls));
  }

  function PoolRow(props) {
    var name = props.name, p = props.pool;
    var capState = React.useState(p.cap == null ? "" : String(p.cap));
    var warmState = React.useState(String(p.min_warm));
    function apply() {
      var cap = capState[0].trim() === "" ? null : parseInt(capState[0], 10);
      send({action: "set_pool", pool: name, cap: cap, min_warm: parseInt(warmState[0] || "0", 10)},
           props.report);
    }
    return h("tr", {"data-pool": name},
      h("td", null, name),
      h("td", null, p.instances), h("td", null, p.idle),
      h("td", null, h("input", {className: "dockerami-cap", size: 4, placeholder: "none",
        value: capState[0], onChange: function (e) { capState[1](e.target.value); }})),
      h("td", null, h("input", {className: "dockerami-min-warm", size: 4,
        value: warmState[0], onChange: function (e) { warmState[1](e.target.value); }})),
      h("td", null, button("Apply", "dockerami-apply-pool", apply)));
  }

  function FleetPage() {
    var state = React.useState(null), data = state[0], setData = state[1];
    var err = React.useState(null), error = err[0], setError = err[1];
    var msg = React.useState(null), outcome = msg[0], setOutcome = msg[1];
    React.useEffect(function () {
      var stopped = false;
      function load() {
        fetch(API).then(function (r) {
          if (!r.ok) throw new Error("HTTP " + r.status);
          return r.json();
        }).then(function (d) { if (!stopped) { setData(d); setError(null); } },
                function (e) { if (!stopped) setError(String(e)); });
      }
      load();
      var timer = setInterval(load, 2000);
      return function () { stopped = true; clearInterval(timer); };
    }, []);
    if (!data) return h("div", {className: "container"}, error ? "Fleet: " + error : "Loading fleet\u2026");
    var head = ["Worker", "State", "Instance", "Type", "AZ", "Market", "Image", "Launched",
                "Uptime", "Cost so far", "Build", "Provisioning", ""];
    return h("div", {className: "container-fluid dockerami-fleet"},
      h("h2", null, "Fleet"),
      h("p", null, "Master " + data.master_id + ". " + data.workers.length + " workers."),
      outcome ? h("p", {className: "dockerami-outcome " +
                          (outcome.error ? "text-danger" : "text-success")},
                  outcome.error || outcome.ok) : null,
      h("table", {className: "table table-condensed table-striped dockerami-workers"},
        h("thead", null, h("tr", null, head.map(function (c) { return h("th", {key: c}, c); }))),
        h("tbody", null, data.workers.map(function (w) {
          return h(WorkerRow, {key: w.name, worker: w, report: setOutcome});
        }))),
      Object.keys(data.pools).length
        ? h("div", null, h("h3", null, "Pools"),
            h("table", {className: "table table-condensed dockerami-pools"},
              h("thead", null, h("tr", null, ["Pool", "Instances", "Idle", "Cap",
                "Warm minimum", ""].map(function (c) { return h("th", {key: c}, c); }))),
              h("tbody", null, Object.keys(data.pools).map(function (name) {
                return h(PoolRow, {key: name, name: name, pool: data.pools[name],
                                   report: setOutcome});
              }))))
        : null,
      h("h3", null, "Orphaned instances"),
      data.orphans.length === 0
        ? h("p", {className: "dockerami-no-orphans"}, "None: every instance tagged for this master is owned by a worker.")
        : h("table", {className: "table table-condensed dockerami-orphans"},
            h("thead", null, h("tr", null, ["Instance", "State", "Type", "AZ", ""].map(function (c) {
              return h("th", {key: c}, c); }))),
            h("tbody", null, data.orphans.map(function (o) {
              return h("tr", {key: o.id, "data-orphan": o.id},
                h("td", null, o.id), h("td", null, o.state), h("td", null, o.type),
                h("td", null, o.availability_zone),
                h("td", null, button("Terminate", "dockerami-terminate-orphan", function () {
                  send({action: "terminate_orphan", instance_id: o.id}, setOutcome); })));
            }))),
      data.terminations_failing.length
        ? h("p", {className: "text-danger"}, "Terminations failing (retried every minute): " +
            data.terminations_failing.join(", "))
        : null,
      error ? h("p", {className: "text-warning"}, "Last refresh failed: " + error) : null);
  }

  window.BuildbotPluginSupport.buildbotSetupPlugin(function (reg) {
    reg.registerMenuGroup({name: "dockerami", caption: "Fleet", icon: h("span", null, "\u2601"),
                           order: 20, route: "/dockerami", parentName: null});
    reg.registerRoute({route: "/dockerami", group: "dockerami", element: function () {
      return h(FleetPage);
    }});
  });
})();
