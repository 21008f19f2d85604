import json,sys,glob,statistics as st,collections
d=sys.argv[1]
rows=collections.defaultdict(list)
for f in sorted(glob.glob(d+'/*.jsonl')):
    name=f.split('/')[-1].rsplit('-',1)[0]
    for l in open(f):
        j=json.loads(l)
        if j.get('kind')!='run': continue
        r=j['run']
        if r['engine']!='ferry': continue
        rows[(r['workload']['level'],name)].append(r)
for k,v in sorted(rows.items()):
    f=lambda key: [x[key] for x in v if x.get(key) is not None]
    print(k,'n=%d'%len(v),'total %.0f'%st.median(f('total_ms')),'src %.3f [%s]'%(st.median(f('src_engine_cpu_s')),' '.join('%.2f'%x for x in f('src_engine_cpu_s'))),'dst %.3f [%s]'%(st.median(f('dst_engine_cpu_s')),' '.join('%.2f'%x for x in f('dst_engine_cpu_s'))), 'busy',sum(1 for x in v if x.get('busy')))
