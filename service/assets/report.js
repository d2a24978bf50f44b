const config = JSON.parse(document.getElementById('config').textContent);
const $ = (id) => document.getElementById(id);
$('example').onclick = () => { $('activation').value = config.example.join(', '); };
function esc(text) { const d = document.createElement('div'); d.textContent = text; return d.innerHTML; }
async function run() {
  const values = $('activation').value.split(/[\s,]+/).filter(Boolean).map(Number);
  const method = $('method').value;
  const body = {activations: [values], method, certify: true, positive: $('positive').checked,
                compare_encoder: config.encoder};
  if (method === 'omp') body.k = Number($('k').value); else body.alpha = Number($('alpha').value);
  const headers = {'Content-Type': 'application/json'};
  if ($('key').value) headers['Authorization'] = 'Bearer ' + $('key').value;
  const summary = $('result-summary');
  summary.textContent = 'unfolding…';
  let answer;
  try {
    const response = await fetch('/v1/dictionaries/' + config.dictionary + '/unfold',
                                 {method: 'POST', headers, body: JSON.stringify(body)});
    answer = await response.json();
    if (!response.ok) { summary.innerHTML = '<span class="no">' + esc(answer.error.code) +
                        '</span>: ' + esc(answer.error.message); $('result-plot').setAttribute('height', 0);
                        return; }
  } catch (error) { summary.textContent = 'request failed: ' + error; return; }
  const code = answer.codes[0];
  const order = code.values.map((v, i) => i).sort((a, b) => Math.abs(code.values[b]) - Math.abs(code.values[a])).slice(0, 20);
  const certified = answer.certified[0];
  const stability = answer.support_stability[0];
  summary.innerHTML = (certified ? '<span class="ok" id="certificate">certified</span>'
                                 : '<span class="no" id="certificate">not certified</span>') +
    ' · ERC margin ' + (answer.erc_margin[0] === null ? 'n/a' : answer.erc_margin[0].toFixed(3)) +
    ' · support stability ' + (stability === null ? 'n/a' : stability.toPrecision(3)) +
    ' · relative error ' + answer.relative_error[0].toExponential(2) +
    ' · ' + esc(answer.messages[0]);
  if (answer.encoder) {
    const e = answer.encoder;
    summary.innerHTML += '<br><span id="encoder-summary">SAE encoder: ' + e.l0[0] +
      ' codes, relative error ' + e.relative_error[0].toExponential(2) + ' (' +
      e.relative_error_at_l0[0].toExponential(2) + ' with its ' + answer.l0[0] +
      ' largest); it shares ' + (100 * e.support_overlap[0]).toFixed(0) +
      '% of the features unfolded</span>';
  }
  const svg = $('result-plot');
  const rowHeight = 20, left = 180, width = 640;
  const largest = Math.max(...order.map((i) => Math.abs(code.values[i])), 1e-30);
  svg.setAttribute('height', order.length * rowHeight + 10);
  svg.setAttribute('viewBox', '0 0 ' + width + ' ' + (order.length * rowHeight + 10));
  svg.innerHTML = order.map((i, row) => {
    const value = code.values[i];
    const label = code.labels ? code.labels[i] : 'feature ' + code.indices[i];
    const bar = (width - left - 80) * Math.abs(value) / largest;
    const y = 5 + row * rowHeight;
    return '<text x="' + (left - 6) + '" y="' + (y + 14) + '" text-anchor="end">' + esc(label) +
      ' (' + code.indices[i] + ')</text><rect class="feature-bar" x="' + left + '" y="' + (y + 3) +
      '" width="' + bar.toFixed(1) + '" height="14" fill="' + (value >= 0 ? '#4c78a8' : '#e45756') +
      '"></rect><text x="' + (left + bar + 4) + '" y="' + (y + 14) + '">' + value.toPrecision(4) + '</text>';
  }).join('');
}
$('run').onclick = run;
if (location.hash === '#example') { $('example').onclick(); run(); }
