// Customer tracking page: /track/{token}. Reads {token}/state once, then follows
// {token}/events (Server-Sent Events, `id:` = the delivery's version).
'use strict';
(() => {
  const STAGES = {
    Created: ['Order received', 'Waiting for a drone'],
    Rescheduled: ['Rescheduled', 'Waiting for a drone'],
    HeadedToPickup: ['Drone on its way', 'A drone is flying to pick up the package'],
    HeadedToDropoff: ['Picked up', 'Your package is on its way'],
    Completed: ['Delivered', 'Delivered'],
    Cancelled: ['Cancelled', 'Cancelled'],
  };
  const CANCEL = {
    ByTenant: 'by the sender',
    NoCapableDrone: 'no drone can carry this package',
    QueueFull: 'too many deliveries were waiting',
    DeadlinePassed: 'its deadline passed',
    WaitedTooLong: 'it waited too long for a drone',
  };
  const MOVING = new Set(['HeadedToPickup', 'HeadedToDropoff']);
  const TERMINAL = new Set(['Completed', 'Cancelled']);
  const SVGNS = 'http://www.w3.org/2000/svg';
  const W = 400, H = 300, PAD = 40;
  const MAX_BACKOFF = 30000;

  const $ = (id) => document.getElementById(id);
  const base = location.pathname.replace(/\/+$/, '');
  const token = base.slice(base.lastIndexOf('/') + 1);

  let current = null;   // the newest state shown
  let lastId = null;    // the newest event id seen on the stream
  let es = null;
  let backoff = 1000;
  let retryTimer = 0;
  let stopped = false;
  const track = [];     // drone positions seen, oldest first
  const map = {};

  // ---------- formatting ----------
  const pad2 = (n) => String(n).padStart(2, '0');
  function left(ms) {
    const t = Math.ceil(ms / 1000);
    const h = Math.floor(t / 3600), m = Math.floor((t % 3600) / 60), s = t % 60;
    if (h) return `in ${h} h ${pad2(m)} min`;
    if (m) return `in ${m} min ${pad2(s)} s`;
    return `in ${s} s`;
  }
  function clock(ms, seconds) {
    const d = new Date(ms);
    const opts = { hour: '2-digit', minute: '2-digit' };
    if (seconds) opts.second = '2-digit';
    if (d.toDateString() !== new Date().toDateString()) { opts.month = 'short'; opts.day = 'numeric'; }
    return d.toLocaleString(undefined, opts);
  }
  function coord(v, pos, neg) {
    return `${Math.abs(v).toFixed(5)}° ${v >= 0 ? pos : neg}`;
  }
  function km(a, b) {
    const r = Math.PI / 180;
    const dLat = (b.latitude - a.latitude) * r, dLon = (b.longitude - a.longitude) * r;
    const h = Math.sin(dLat / 2) ** 2 +
      Math.cos(a.latitude * r) * Math.cos(b.latitude * r) * Math.sin(dLon / 2) ** 2;
    return 12742 * Math.asin(Math.min(1, Math.sqrt(h)));
  }
  const dist = (k) => (k < 1 ? `${Math.round(k * 1000)} m` : `${k.toFixed(1)} km`);
  const valid = (p) => p && Number.isFinite(p.latitude) && Number.isFinite(p.longitude) &&
    Math.abs(p.latitude) <= 90 && Math.abs(p.longitude) <= 180;

  // ---------- connection ----------
  function setConn(text, state) {
    $('connection').textContent = text;
    $('connection').parentElement.dataset.state = state;
  }

  function showError() {
    stopped = true;
    clearTimeout(retryTimer);
    if (es) { es.close(); es = null; }
    $('content').hidden = true;
    $('error').hidden = false;
    $('connection').parentElement.hidden = true;
    $('sub').hidden = true;
    document.title = 'Tracking link invalid';
  }

  // 'ok' | 'gone' (invalid or expired link) | 'error' (try again later)
  async function loadState() {
    try {
      const r = await fetch(`${base}/state`, { headers: { Accept: 'application/json' }, cache: 'no-store' });
      if (r.status === 404) {
        // A delivery not known yet (just posted, or a server still reading its state)
        // is tried again; a link that names nothing is not.
        const problem = await r.json().catch(() => ({}));
        if (String(problem.type || '').endsWith(':unknown_delivery')) return 'error';
        showError();
        return 'gone';
      }
      if (r.status >= 400 && r.status < 500 && r.status !== 408 && r.status !== 429) {
        showError();
        return 'gone';
      }
      if (!r.ok) return 'error';
      apply(await r.json());
      return 'ok';
    } catch {
      return 'error';
    }
  }

  function connect() {
    if (stopped) return;
    if (es) es.close();
    const url = lastId === null ? `${base}/events` : `${base}/events?lastEventId=${lastId}`;
    const src = new EventSource(url);
    es = src;
    src.onopen = () => { backoff = 1000; setConn('live', 'live'); };
    src.onerror = () => {
      if (es !== src) return;
      if (src.readyState === EventSource.CLOSED) retry();
      else setConn('reconnecting…', 'down'); // the browser reconnects by itself
    };
    for (const type of ['stage', 'position', 'message']) src.addEventListener(type, onEvent);
  }

  function retry() {
    if (es) { es.close(); es = null; }
    if (stopped) return;
    setConn('reconnecting…', 'down');
    const delay = backoff;
    backoff = Math.min(backoff * 2, MAX_BACKOFF);
    clearTimeout(retryTimer);
    retryTimer = setTimeout(async () => {
      if ((await loadState()) === 'gone') return;
      if (current && TERMINAL.has(current.stage)) {
        // Over (the server ended the stream, or answered 204): nothing more will come.
        stopped = true;
        setConn('finished', 'ended');
        return;
      }
      connect();
    }, delay);
  }

  function onEvent(ev) {
    if (stopped) return;
    const id = Number.parseInt(ev.lastEventId, 10);
    if (Number.isFinite(id)) {
      if (lastId !== null && id <= lastId) return;
      lastId = id;
    }
    let d;
    try { d = JSON.parse(ev.data); } catch { return; }
    if (!d || typeof d !== 'object') return;
    if (ev.type === 'stage') addTimeline(d, Number.isFinite(id) ? id : d.version);
    apply(d);
    if (TERMINAL.has(d.stage) && current === d) {
      // Nothing changes after this: let the server go.
      stopped = true;
      if (es) { es.close(); es = null; }
      setConn('finished', 'ended');
    }
  }

  // ---------- state ----------
  function apply(d) {
    if (!d.stage) return;
    const p = d.lastKnownLocation;
    if (valid(p) && (d.droneId || MOVING.has(d.stage) || d.stage === 'Completed')) {
      const last = track[track.length - 1];
      if (!last || last.latitude !== p.latitude || last.longitude !== p.longitude) {
        track.push({ latitude: p.latitude, longitude: p.longitude });
        if (track.length > 2000) track.splice(1, 1);
      }
    }
    if (current && Number.isFinite(d.version) && Number.isFinite(current.version) &&
        d.version < current.version) {
      drawMap(); // an older event (replay): it only adds to the drone's track
      return;
    }
    current = d;
    render();
  }

  function render() {
    const d = current;
    $('delivery-id').textContent = d.deliveryId || token;
    const stage = $('stage');
    if (stage.textContent !== d.stage) stage.textContent = d.stage;
    stage.dataset.stage = d.stage;
    let desc = (STAGES[d.stage] || [d.stage, d.stage])[1];
    if (d.stage === 'Cancelled' && d.cancelReason) {
      desc = `Cancelled: ${CANCEL[d.cancelReason] || d.cancelReason}`;
    }
    if ($('stage-desc').textContent !== desc) $('stage-desc').textContent = desc;
    document.title = `${desc} · Track your delivery`;
    const pkg = [];
    if (d.packageSize) pkg.push(`${d.packageSize} package`);
    if (Number.isFinite(d.packageWeight)) pkg.push(`${d.packageWeight} kg`);
    const dl = Date.parse(d.deadline);
    if (!Number.isNaN(dl) && !TERMINAL.has(d.stage)) pkg.push(`due by ${clock(dl)}`);
    $('package').replaceChildren(...pkg.flatMap((text, i) => {
      const span = document.createElement('span');
      span.className = 'nw';
      span.textContent = text;
      return i ? [' · ', span] : [span];
    }));
    tick();
    drawMap();
  }

  function eta(which) {
    const el = $(`${which}-eta`), at = $(`${which}-at`);
    const d = current;
    const iso = which === 'pickup' ? d.pickupETA : d.deliveryETA;
    const reached = which === 'pickup'
      ? d.stage === 'HeadedToDropoff' || d.stage === 'Completed'
      : d.stage === 'Completed';
    const t = iso ? Date.parse(iso) : NaN;
    let text;
    if (reached) text = 'arrived';
    else if (d.stage === 'Cancelled' || Number.isNaN(t)) text = '—';
    else text = t > Date.now() ? left(t - Date.now()) : 'due now';
    if (el.textContent !== text) el.textContent = text;
    if (Number.isNaN(t) || d.stage === 'Cancelled') {
      at.removeAttribute('datetime');
      at.textContent = '';
    } else if (at.getAttribute('datetime') !== iso) {
      at.setAttribute('datetime', iso);
      at.textContent = `(${reached ? '' : 'at '}${clock(t)})`;
    }
  }

  function tick() {
    if (!current) return;
    eta('pickup');
    eta('delivery');
  }

  function addTimeline(d, version) {
    const ol = $('timeline');
    const key = String(version);
    if (ol.querySelector(`li[data-version="${CSS.escape(key)}"]`)) return;
    const li = document.createElement('li');
    li.dataset.version = key;
    li.dataset.stage = d.stage;
    const name = document.createElement('span');
    name.className = 'tl-name';
    name.textContent = d.stage;
    const desc = document.createElement('span');
    desc.className = 'tl-desc';
    desc.textContent = (STAGES[d.stage] || [''])[0];
    li.append(name, desc);
    const t = Date.parse(d.updatedAt);
    if (!Number.isNaN(t)) {
      const time = document.createElement('time');
      time.setAttribute('datetime', d.updatedAt);
      time.textContent = clock(t, true);
      li.append(time);
    }
    const next = [...ol.children].find((x) => Number(x.dataset.version) > Number(version));
    ol.insertBefore(li, next || null);
  }

  // ---------- map ----------
  function svg(tag, attrs, parent) {
    const el = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
    if (parent) parent.append(el);
    return el;
  }

  function buildMap() {
    const root = svg('svg', {
      viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: 'xMidYMid meet',
      role: 'img', 'aria-labelledby': 'map-title', focusable: 'false',
    });
    map.title = svg('title', { id: 'map-title' }, root);
    map.title.textContent = 'Map: pickup and drop-off locations';
    svg('rect', { class: 'map-bg', x: 0, y: 0, width: W, height: H }, root);
    const grid = svg('g', { class: 'map-grid', 'aria-hidden': 'true' }, root);
    for (let x = 50; x < W; x += 50) svg('line', { x1: x, y1: 0, x2: x, y2: H }, grid);
    for (let y = 50; y < H; y += 50) svg('line', { x1: 0, y1: y, x2: W, y2: y }, grid);
    map.route = svg('line', { class: 'route' }, root);
    map.trail = svg('polyline', { class: 'trail', points: '' }, root);
    map.pickup = svg('rect', { class: 'm-pickup', width: 16, height: 16, rx: 2 }, root);
    map.dropoff = svg('rect', { class: 'm-dropoff', width: 15, height: 15, rx: 2 }, root);
    map.pickupLabel = svg('text', { class: 'm-label' }, root);
    map.pickupLabel.textContent = 'Pickup';
    map.dropoffLabel = svg('text', { class: 'm-label' }, root);
    map.dropoffLabel.textContent = 'Drop-off';
    map.halo = svg('circle', { class: 'drone-halo drone-off', r: 16, cx: W / 2, cy: H / 2 }, root);
    map.drone = svg('circle', { id: 'drone-marker', class: 'drone-off', r: 8, cx: W / 2, cy: H / 2 }, root);
    $('map').append(root);
  }

  // Equirectangular over the bounding box of every point, longitude scaled by
  // cos(mid latitude), fitted into the fixed viewBox with padding.
  function projection(points) {
    let minLat = 90, maxLat = -90, minLon = 180, maxLon = -180;
    for (const p of points) {
      minLat = Math.min(minLat, p.latitude); maxLat = Math.max(maxLat, p.latitude);
      minLon = Math.min(minLon, p.longitude); maxLon = Math.max(maxLon, p.longitude);
    }
    const k = Math.cos(((minLat + maxLat) / 2) * Math.PI / 180);
    const spanX = Math.max((maxLon - minLon) * k, 0.002);
    const spanY = Math.max(maxLat - minLat, 0.002);
    const s = Math.min((W - 2 * PAD) / spanX, (H - 2 * PAD) / spanY);
    const cx = ((minLon + maxLon) / 2) * k, cy = (minLat + maxLat) / 2;
    const r = (v) => Math.round(v * 10) / 10;
    return (p) => [r(W / 2 + (p.longitude * k - cx) * s), r(H / 2 - (p.latitude - cy) * s)];
  }

  function place(label, [x, y]) {
    const right = x > W - 60, left = x < 60;
    label.setAttribute('text-anchor', right ? 'end' : left ? 'start' : 'middle');
    label.setAttribute('x', right ? x + 8 : left ? x - 8 : x);
    label.setAttribute('y', y < 40 ? y + 26 : y - 14);
  }

  function drawMap() {
    const d = current;
    if (!d) return;
    const pick = valid(d.pickupLocation) ? d.pickupLocation : null;
    const drop = valid(d.dropOffLocation) ? d.dropOffLocation : null;
    const points = [pick, drop, ...track].filter(Boolean);
    if (!points.length) return;
    const xy = projection(points);
    if (pick) {
      const [x, y] = xy(pick);
      map.pickup.setAttribute('x', x - 8); map.pickup.setAttribute('y', y - 8);
      place(map.pickupLabel, [x, y]);
    }
    if (drop) {
      const [x, y] = xy(drop);
      map.dropoff.setAttribute('x', x - 7.5); map.dropoff.setAttribute('y', y - 7.5);
      map.dropoff.setAttribute('transform', `rotate(45 ${x} ${y})`);
      place(map.dropoffLabel, [x, y]);
    }
    if (pick && drop) {
      const [x1, y1] = xy(pick), [x2, y2] = xy(drop);
      Object.entries({ x1, y1, x2, y2 }).forEach(([k, v]) => map.route.setAttribute(k, v));
    }
    map.trail.setAttribute('points', track.map((p) => xy(p).join(',')).join(' '));

    const here = track[track.length - 1];
    const hasDrone = Boolean(here) && d.stage !== 'Cancelled' && d.stage !== 'Created' &&
      d.stage !== 'Rescheduled';
    map.drone.classList.toggle('drone-off', !hasDrone);
    map.halo.classList.toggle('drone-off', !hasDrone);
    let label;
    if (hasDrone) {
      const [x, y] = xy(here);
      for (const el of [map.drone, map.halo]) { el.setAttribute('cx', x); el.setAttribute('cy', y); }
      map.drone.setAttribute('data-lat', here.latitude);
      map.drone.setAttribute('data-lon', here.longitude);
      $('position').textContent =
        `Drone at ${coord(here.latitude, 'N', 'S')}, ${coord(here.longitude, 'E', 'W')}`;
      if (d.stage === 'Completed') label = 'Map: the drone has reached the drop-off';
      else if (d.stage === 'HeadedToPickup' && pick) {
        label = `Map: drone flying to the pickup, ${dist(km(here, pick))} away`;
      } else if (drop) {
        label = `Map: drone between pickup and drop-off, ${dist(km(here, drop))} left to the drop-off`;
      } else label = 'Map: drone between pickup and drop-off';
    } else {
      map.drone.removeAttribute('data-lat');
      map.drone.removeAttribute('data-lon');
      $('position').textContent = d.stage === 'Cancelled' ? 'No drone: the delivery was cancelled'
        : 'No drone assigned yet';
      label = pick && drop
        ? `Map: pickup and drop-off, ${dist(km(pick, drop))} apart${d.stage === 'Cancelled' ? '' : '; no drone yet'}`
        : 'Map: pickup and drop-off';
    }
    map.title.textContent = label;
  }

  // ---------- start ----------
  async function start() {
    buildMap();
    if (!token || token === 'track') { showError(); return; }
    setInterval(tick, 1000);
    window.addEventListener('online', () => {
      if (!stopped && !es) { clearTimeout(retryTimer); backoff = 1000; connect(); }
    });
    if ((await loadState()) === 'gone') return;
    connect();
  }

  start();
})();
